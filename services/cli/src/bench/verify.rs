//! `tollgate bench verify`: how much of a bare HTTP handler's throughput and latency full verification keeps.
//!
//! The bench makes its own database, stream and prefixes on the configured servers, stores `--keys` keys, and starts
//! two child processes from this same binary: a validator, and a trivial axum handler that answers 200 to everything.
//! It then drives both with the same lean client (`client.rs`) over `--concurrency` connections: first closed-loop
//! (as fast as they go) for throughput, then open-loop at the same fixed rate for latency (a request held back by a
//! slow answer counts from its scheduled time, so a stall is not hidden by the client waiting). Finally it reads the
//! validator's RSS with every key cached. Both kinds of phase alternate in rounds (trivial, verify, trivial, …), so
//! that a machine whose speed drifts from minute to minute (a shared VM) slows both alike. Each verify is a full one:
//! cached key, two applicable limits (the key's and the organization's per-minute limit, set high enough never to
//! deny), event published to JetStream. The bench counts what would make a measured verify less than that (a decision
//! without Redis, a key read from PostgreSQL, an event spooled to disk or not acknowledged by JetStream at all, a
//! failed request) and fails, after its report, if any was. It also
//! reports, per phase, the CPU time the hypervisor took from the machine (Linux's `steal`): a burst of it stalls
//! whichever server is being measured, which shows which side of a run's ratios it fell on. And it reports the CPU
//! time per request of the measured server (the validator's is what sizing a deployment needs) and of the whole
//! machine: every process shares the same cores, so the machine's CPU per request (the client's, Redis's and NATS's
//! with the server's) bounds the throughput ratio, and the summary prints that bound (BENCHMARKS.md, 2026-12-07).
//! `--without-limits` gives the keys and their organization no limit, so that the difference is the rate limiter's
//! cost (a verify with no applicable limit makes no Redis call). `--calibrate` measures a second trivial handler in
//! the validator's place: the ratios it gives are this machine's noise alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use uuid::Uuid;

use clap::builder::RangedU64ValueParser;

use tollgate_shared::config::{period, ServerArgs};
use tollgate_shared::connect;
use tollgate_shared::key::{ApiKey, KeyEnv};
use tollgate_shared::metrics::{EVENTS_PUBLISHED, EVENTS_SPOOLED, KEY_LOOKUPS, RATELIMIT_DEGRADED};

use super::client::{Connection, Target};
use super::cpu::{cpu_of, rss_mib, MachineCpu};
use super::namespace::BenchNamespace;
use super::processes::{spawn_trivial, spawn_validator, start_server};

#[derive(clap::Args, Debug)]
pub struct VerifyBenchArgs {
    /// Keys to create and spread the load over (all are cached before measuring: at most the validator's default key
    /// cache).
    #[arg(long, default_value_t = 100_000, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub keys: usize,
    /// Connections of each phase (the default is enough to keep both servers busy in the closed loop: with 32, a
    /// verify waiting on Redis left a fifth of this 2-core machine idle).
    #[arg(long, default_value_t = 64, value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub concurrency: usize,
    /// Length of each measured phase (1s to 1h).
    #[arg(long, default_value = "10s", value_parser = period(Duration::from_secs(1), Duration::from_secs(3600)))]
    pub duration: Duration,
    /// Rounds each kind of phase (closed loop, then open loop) is split into, alternating trivial and verify (the
    /// default is enough to even out the machine's drifts: with the trivial handler on both sides, `--calibrate`, the
    /// throughput ratio strayed from 100 % by 1.3 points on average and 4.7 at most with 20 rounds, against 3.4 and
    /// 9.0 with 5; BENCHMARKS.md).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// Requests per second of the latency phase (by default a quarter of the validator's closed-loop throughput, a
    /// rate this machine's client can hold on schedule).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: Option<u64>,
    /// Give the keys and their organization no rate limit (no Redis call): the rate limiter's cost is the
    /// difference from a run without this flag.
    #[arg(long)]
    pub without_limits: bool,
    /// Tokio worker threads of each server, the validator and the trivial handler alike (`TOKIO_WORKER_THREADS`).
    /// One, because on a 2-core machine that also runs the client, Redis and NATS both servers served more with one
    /// than with one per core (BENCHMARKS.md); give the core count to compare.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub server_threads: u16,
    /// Measure a second trivial handler where the validator would be, so that both sides are the same: the ratios
    /// then show only this machine's noise (ideally 100 % and 1×), and so how far a real run's can stray by chance.
    /// Give it a real run's `--rate` to calibrate the latency phase at the same load.
    #[arg(long)]
    pub calibrate: bool,
}

#[derive(Serialize)]
struct Phase {
    requests: u64,
    errors: u64,
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    /// CPU time the server used per answered request, user and system together (`/proc/PID/stat`; none where that
    /// cannot be read).
    server_cpu_us: Option<f64>,
    /// CPU time the whole machine used per answered request: the client, the server, Redis, NATS and anything else
    /// (`/proc/stat`; none where that cannot be read). What bounds the throughput ratio: with no idle time on either
    /// side, the ratio is the trivial handler's figure over verify's.
    machine_cpu_us: Option<f64>,
    /// CPU time the hypervisor took from the machine during the phase, all CPUs together (`steal` in `/proc/stat`;
    /// none where that cannot be read).
    stolen_ms: Option<u64>,
}

#[derive(Serialize)]
struct Report {
    keys: usize,
    limits: bool,
    /// Whether a second trivial handler stood in for the validator (`--calibrate`).
    calibrate: bool,
    concurrency: usize,
    rounds: u32,
    /// Tokio worker threads of each server.
    server_threads: u16,
    trivial_throughput: Phase,
    verify_throughput: Phase,
    latency_rate: u64,
    trivial_latency: Phase,
    verify_latency: Phase,
    throughput_ratio: f64,
    /// The trivial handler's machine CPU per request over verify's, in the closed loops: the throughput ratio a
    /// machine with no idle time would give.
    cpu_ratio: Option<f64>,
    p99_ratio: f64,
    /// The second trivial handler's, with `--calibrate`.
    validator_rss_mib: f64,
    /// What made measured verifies less than full ones: none in a valid run.
    shortfall: Shortfall,
}

/// Counts, over the measured phases, of what makes a verify less than a full one: a decision taken without Redis
/// (its call failed or timed out), a key read from PostgreSQL rather than the cache, an event spooled to disk rather
/// than published, or neither (still queued, or lost), and a request that failed. All 0 in a valid run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
struct Shortfall {
    decided_without_redis: u64,
    keys_read_from_postgres: u64,
    events_spooled: u64,
    events_unpublished: u64,
    failed_requests: u64,
}

/// Longest the bench waits, after the measured phases, for their events to be acknowledged by JetStream or spooled:
/// more than the validator's default publish timeout (2 s), after which a message not acknowledged is spooled.
const EVENTS_SETTLE: Duration = Duration::from_secs(5);

/// The validator's counters that say whether its verifies were full ones.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    decided_without_redis: u64,
    keys_read_from_postgres: u64,
    events_spooled: u64,
    events_published: u64,
}

impl Totals {
    /// The validator's totals so far, from its metrics endpoint.
    async fn read(client: &reqwest::Client, metrics: &str) -> anyhow::Result<Totals> {
        let text = client.get(metrics).send().await?.error_for_status()?.text().await?;
        Ok(Totals {
            decided_without_redis: counter_total(&text, RATELIMIT_DEGRADED),
            keys_read_from_postgres: counter_total(&text, &format!("{KEY_LOOKUPS}{{source=\"database\"}}")),
            events_spooled: counter_total(&text, EVENTS_SPOOLED),
            events_published: counter_total(&text, EVENTS_PUBLISHED),
        })
    }

    /// Once `events` events after `before` are published or spooled (or [`EVENTS_SETTLE`] has passed), what the
    /// validator counted since `before`.
    async fn settled(client: &reqwest::Client, metrics: &str, before: Totals, events: u64) -> anyhow::Result<Totals> {
        let deadline = Instant::now() + EVENTS_SETTLE;
        loop {
            let since = Totals::read(client, metrics).await?.since(before);
            if since.events_published + since.events_spooled >= events || Instant::now() >= deadline {
                return Ok(since);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn since(self, before: Totals) -> Totals {
        Totals {
            decided_without_redis: self.decided_without_redis.saturating_sub(before.decided_without_redis),
            keys_read_from_postgres: self.keys_read_from_postgres.saturating_sub(before.keys_read_from_postgres),
            events_spooled: self.events_spooled.saturating_sub(before.events_spooled),
            events_published: self.events_published.saturating_sub(before.events_published),
        }
    }

    /// What fell short, for `events` verifies answered and `failed_requests`.
    fn shortfall(self, events: u64, failed_requests: u64) -> Shortfall {
        Shortfall {
            decided_without_redis: self.decided_without_redis,
            keys_read_from_postgres: self.keys_read_from_postgres,
            events_spooled: self.events_spooled,
            events_unpublished: events.saturating_sub(self.events_published + self.events_spooled),
            failed_requests,
        }
    }
}

pub async fn run(servers: &ServerArgs, args: VerifyBenchArgs, json: bool) -> anyhow::Result<()> {
    let bench = BenchNamespace::new(servers);
    let report = bench.run(servers, measure(servers, &bench, &args)).await?;
    crate::output::print(json, &report, render)?;
    let Shortfall {
        decided_without_redis,
        keys_read_from_postgres,
        events_spooled,
        events_unpublished,
        failed_requests,
    } = report.shortfall;
    anyhow::ensure!(
        report.shortfall == Shortfall::default(),
        "measured verifies that were not full ones: {decided_without_redis} decided without Redis, \
         {keys_read_from_postgres} keys read from PostgreSQL, {events_spooled} events spooled, {events_unpublished} \
         events not published, {failed_requests} requests failed; these figures are not all of full verification: run \
         again"
    );
    Ok(())
}

async fn measure(servers: &ServerArgs, bench: &BenchNamespace, args: &VerifyBenchArgs) -> anyhow::Result<Report> {
    let pool = connect::postgres_migrated(&bench.database_url, 4).await?;
    eprintln!("creating {} keys…", args.keys);
    let keys = create_keys(&pool, args.keys, !args.without_limits).await?;

    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency * 2).build()?;
    // Its own, so that the bench runs beside any other validator; removed with it.
    let spool = tempfile::tempdir().context("cannot make the bench validator's spool directory")?;
    // Both run until this function returns, however it returns.
    let (validator_process, [validator_port, metrics_port]) = start_server(&client, |[port, metrics_port]| {
        let own = (&bench.database_url, &bench.names, spool.path());
        spawn_validator(servers, own, (port, metrics_port), args.server_threads)
    })
    .await?;
    let (trivial_process, [trivial_port]) =
        start_server(&client, |[port]| spawn_trivial(port, args.server_threads)).await?;
    // The server measured against the trivial handler: the validator, or with --calibrate another trivial handler
    // (the validator still runs, warmed, so that the machine is as busy as in a real run).
    let (_copy_process, measured) = if args.calibrate {
        let (process, [port]) = start_server(&client, |[port]| spawn_trivial(port, args.server_threads)).await?;
        let pid = process.0.id();
        (Some(process), (Target::auth(port), pid))
    } else {
        (None, (Target::auth(validator_port), validator_process.0.id()))
    };

    eprintln!("warming the cache with every key…");
    warm(&client, &Target::auth(validator_port).url(), &keys).await?;
    let mut trivial =
        Server::open(Target::auth(trivial_port), trivial_process.0.id(), args.concurrency, &keys[0]).await?;
    let mut measured = Server::open(measured.0, measured.1, args.concurrency, &keys[0]).await?;
    let keys = Arc::new(keys);
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    // After the warm-up's events (and those of the requests that opened the validator's connections) are published,
    // so that they are not counted for the measured verifies'.
    let opening = if args.calibrate { 0 } else { args.concurrency };
    let warmed = Totals::settled(&client, &metrics, Totals::default(), (keys.len() + opening) as u64).await?;

    eprintln!(
        "closed loop, {} connections, {:?} each, in {} alternating rounds…",
        args.concurrency, args.duration, args.rounds
    );
    let round = args.duration / args.rounds;
    let (mut trivial_tally, mut verify_tally) = (Tally::default(), Tally::default());
    for _ in 0..args.rounds {
        trivial_tally.add(closed_loop(&mut trivial, &keys, round).await?);
        verify_tally.add(closed_loop(&mut measured, &keys, round).await?);
    }
    let (trivial_throughput, verify_throughput) = (trivial_tally.phase(), verify_tally.phase());
    let rate = args.rate.unwrap_or((verify_throughput.per_second / 4.0) as u64).max(1);
    eprintln!("open loop at {rate}/s, {:?} each, in {} alternating rounds…", args.duration, args.rounds);
    let (mut trivial_tally, mut verify_tally) = (Tally::default(), Tally::default());
    for _ in 0..args.rounds {
        trivial_tally.add(open_loop(&mut trivial, &keys, rate, round).await?);
        verify_tally.add(open_loop(&mut measured, &keys, rate, round).await?);
    }
    let (trivial_latency, verify_latency) = (trivial_tally.phase(), verify_tally.phase());
    let validator_rss_mib = rss_mib(measured.pid)?;
    // The validator's own events: none with --calibrate, whose measured server is a trivial handler.
    let events = if args.calibrate { 0 } else { verify_throughput.requests + verify_latency.requests };
    let failed = [&trivial_throughput, &verify_throughput, &trivial_latency, &verify_latency].map(|p| p.errors);
    let shortfall = Totals::settled(&client, &metrics, warmed, events).await?.shortfall(events, failed.iter().sum());

    Ok(Report {
        keys: keys.len(),
        limits: !args.without_limits,
        calibrate: args.calibrate,
        concurrency: args.concurrency,
        rounds: args.rounds,
        server_threads: args.server_threads,
        throughput_ratio: verify_throughput.per_second / trivial_throughput.per_second,
        cpu_ratio: trivial_throughput.machine_cpu_us.zip(verify_throughput.machine_cpu_us).map(|(t, v)| t / v),
        p99_ratio: verify_latency.p99_us as f64 / trivial_latency.p99_us.max(1) as f64,
        trivial_throughput,
        verify_throughput,
        latency_rate: rate,
        trivial_latency,
        verify_latency,
        validator_rss_mib,
        shortfall,
    })
}

fn render(r: &Report) -> String {
    // What stood against the trivial handler, in the measured phases and as a process.
    let (measured, server) = if r.calibrate { ("copy", "copy") } else { ("verify", "validator") };
    let row = |name: &str, p: &Phase| {
        vec![
            name.to_owned(),
            format!("{:.0}", p.per_second),
            p.p50_us.to_string(),
            p.p99_us.to_string(),
            p.p999_us.to_string(),
            p.errors.to_string(),
            p.server_cpu_us.map_or("-".to_owned(), |us| format!("{us:.1}")),
            p.machine_cpu_us.map_or("-".to_owned(), |us| format!("{us:.1}")),
            p.stolen_ms.map_or("-".to_owned(), |ms| ms.to_string()),
        ]
    };
    let table = crate::output::table(
        &["PHASE", "REQ/S", "P50 µs", "P99 µs", "P99.9 µs", "ERRORS", "CPU µs/REQ", "MACHINE µs/REQ", "STOLEN ms"],
        vec![
            row("trivial, closed loop", &r.trivial_throughput),
            row(&format!("{measured}, closed loop"), &r.verify_throughput),
            row(&format!("trivial at {}/s", r.latency_rate), &r.trivial_latency),
            row(&format!("{measured} at {}/s", r.latency_rate), &r.verify_latency),
        ],
    );
    format!(
        "{table}\n\nkeys {}{} · concurrency {} · server threads {} · {} rounds · {measured}/trivial throughput {:.1}% \
         (CPU per request allows {}) · p99 {measured}/trivial {:.2}× · {server} RSS {:.1} MiB · decided without Redis {} · \
         keys read from PostgreSQL {} · events spooled {} · events not published {} · requests failed {}",
        r.keys,
        if r.limits { "" } else { " (without limits)" },
        r.concurrency,
        r.server_threads,
        r.rounds,
        r.throughput_ratio * 100.0,
        r.cpu_ratio.map_or("-".to_owned(), |ratio| format!("{:.1}%", ratio * 100.0)),
        r.p99_ratio,
        r.validator_rss_mib,
        r.shortfall.decided_without_redis,
        r.shortfall.keys_read_from_postgres,
        r.shortfall.events_spooled,
        r.shortfall.events_unpublished,
        r.shortfall.failed_requests,
    )
}

/// Inserts keys in bulk (the admin path makes one transaction per key, far too slow for 100 000). With `limits`,
/// each key and the organization get a per-minute limit too high to ever deny.
async fn create_keys(pool: &sqlx::PgPool, count: usize, limits: bool) -> anyhow::Result<Vec<String>> {
    let org_id = Uuid::now_v7();
    let per_minute = limits.then_some(1_000_000_000);
    sqlx::query(
        "INSERT INTO organizations (id, name, slug, rate_limit_per_minute, max_api_keys) \
         VALUES ($1, 'Bench', 'bench', $2, 1000000000)",
    )
    .bind(org_id)
    .bind(per_minute)
    .execute(pool)
    .await?;
    let keys: Vec<ApiKey> = (0..count).map(|_| ApiKey::generate(KeyEnv::Test)).collect();
    for chunk in keys.chunks(10_000) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let prefixes: Vec<&str> = chunk.iter().map(|k| k.prefix()).collect();
        let hints: Vec<&str> = chunk.iter().map(|k| k.hint()).collect();
        let hashes: Vec<Vec<u8>> = chunk.iter().map(|k| k.hash().as_bytes().to_vec()).collect();
        sqlx::query(
            "INSERT INTO api_keys (id, org_id, name, prefix, key_hint, key_hash, rate_limit_tier, \
                                   custom_rate_limit_per_minute) \
             SELECT id, $2, 'bench', prefix, hint, hash, 'unlimited', $6 \
             FROM UNNEST($1::uuid[], $3::text[], $4::text[], $5::bytea[]) AS k(id, prefix, hint, hash)",
        )
        .bind(&ids)
        .bind(org_id)
        .bind(&prefixes)
        .bind(&hints)
        .bind(&hashes)
        .bind(per_minute)
        .execute(pool)
        .await?;
    }
    Ok(keys.iter().map(|k| format!("Bearer {}", k.expose())).collect())
}

async fn warm(client: &reqwest::Client, url: &str, keys: &[String]) -> anyhow::Result<()> {
    use futures::StreamExt;
    let statuses: Vec<_> = futures::stream::iter(keys)
        .map(|key| client.get(url).header("authorization", key).send())
        .buffer_unordered(64)
        .collect()
        .await;
    let ok = statuses.iter().filter(|r| r.as_ref().is_ok_and(|r| r.status().is_success())).count();
    anyhow::ensure!(ok == keys.len(), "only {ok} of {} keys verified while warming up", keys.len());
    Ok(())
}

/// The sum of a counter's series (all label sets) in a Prometheus text exposition; 0 when it has none yet.
fn counter_total(exposition: &str, name: &str) -> u64 {
    let series =
        exposition.lines().filter_map(|line| line.strip_prefix(name)).filter(|rest| rest.starts_with([' ', '{']));
    series.filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() as u64
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// A server the bench started, and the bench's connections to it. They stay open across rounds, each opened by one
/// untimed request before the first (a connection opened within a round would count its connect in that round's
/// latency, and the server's first answers would count its warm-up). Each round starts in `keys` where the one before
/// ended, so that the rounds go through all of them rather than the first few thousand again and again.
struct Server {
    pid: u32,
    connections: Vec<Connection>,
    next_key: usize,
}

impl Server {
    async fn open(target: Target, pid: u32, connections: usize, key: &str) -> anyhow::Result<Server> {
        let mut opened = Vec::with_capacity(connections);
        for _ in 0..connections {
            let mut connection = Connection::new(target.clone());
            let status = connection.get(key).await.with_context(|| format!("cannot connect to {}", target.url()))?;
            anyhow::ensure!((200..300).contains(&status), "{} answered {status} to a good key", target.url());
            opened.push(connection);
        }
        Ok(Server { pid, connections: opened, next_key: 0 })
    }
}

/// A phase's requests, summed over its rounds.
struct Tally {
    seen: Seen,
    elapsed: Duration,
    server_cpu: Option<Duration>,
    machine: Option<MachineCpu>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            seen: Seen::default(),
            elapsed: Duration::ZERO,
            server_cpu: Some(Duration::ZERO),
            machine: Some(MachineCpu::default()),
        }
    }
}

impl Tally {
    fn add(&mut self, round: Tally) {
        self.seen.add(&round.seen);
        self.elapsed += round.elapsed;
        self.server_cpu = self.server_cpu.zip(round.server_cpu).map(|(sum, more)| sum + more);
        self.machine = self.machine.zip(round.machine).map(|(sum, more)| sum.plus(more));
    }

    fn phase(&self) -> Phase {
        let histogram = &self.seen.histogram;
        let per_request =
            |cpu: Duration| (!histogram.is_empty()).then(|| cpu.as_secs_f64() * 1e6 / histogram.len() as f64);
        Phase {
            requests: histogram.len(),
            errors: self.seen.errors,
            per_second: histogram.len() as f64 / self.elapsed.as_secs_f64(),
            p50_us: histogram.value_at_quantile(0.5),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            server_cpu_us: self.server_cpu.and_then(per_request),
            machine_cpu_us: self.machine.and_then(|m| per_request(m.busy)),
            stolen_ms: self.machine.map(|m| m.stolen.as_millis() as u64),
        }
    }
}

/// A loop per connection, each sending one request after another for `duration`.
async fn closed_loop(server: &mut Server, keys: &Arc<Vec<String>>, duration: Duration) -> anyhow::Result<Tally> {
    let started = Instant::now();
    let (first, concurrency) = (server.next_key, server.connections.len());
    run_loops(started, server, |n, mut connection| {
        let keys = keys.clone();
        async move {
            let mut seen = Seen::default();
            let mut i = first + n;
            while started.elapsed() < duration {
                let sent = Instant::now();
                seen.record(connection.get(&keys[i % keys.len()]).await, sent);
                i += concurrency;
            }
            (seen, connection)
        }
    })
    .await
}

/// Sends `rate` requests per second on a fixed schedule, whatever the answers' speed, as wrk2 does: each of
/// `connections` loops sends its share of the schedule, one request at a time. A request that an earlier answer on
/// its connection held back past its time counts from that time (so a stall counts in full for every request it
/// held back: no coordinated omission); any other counts from when it went. Counting every request from its time
/// would also count the client's timer, which wakes up to a millisecond late: on this machine that added about
/// 1.1 ms to the trivial handler's p50 and 2 ms to its p99, the same on both sides, which hid most of the difference
/// in the p99 ratio (BENCHMARKS.md, 2026-11-30).
async fn open_loop(
    server: &mut Server,
    keys: &Arc<Vec<String>>,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Tally> {
    let started = Instant::now();
    let interval = Duration::from_secs(1).div_f64(rate as f64);
    let total = (duration.as_secs_f64() * rate as f64) as usize;
    let (first, connections) = (server.next_key, server.connections.len());
    run_loops(started, server, |n, mut connection| {
        let keys = keys.clone();
        async move {
            let mut seen = Seen::default();
            let mut answered = started;
            for i in (n..total).step_by(connections) {
                let scheduled = started + interval.mul_f64(i as f64);
                let since = if answered > scheduled {
                    scheduled
                } else {
                    tokio::time::sleep_until(scheduled.into()).await;
                    Instant::now()
                };
                let answer = connection.get(&keys[(first + i) % keys.len()]).await;
                answered = Instant::now();
                seen.record(answer, since);
            }
            (seen, connection)
        }
    })
    .await
}

/// What request loops saw: each success's latency, and the errors.
struct Seen {
    histogram: Histogram<u64>,
    errors: u64,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen { histogram: histogram(), errors: 0 }
    }
}

impl Seen {
    /// A success's latency from `since`, or an error.
    fn record(&mut self, answer: std::io::Result<u16>, since: Instant) {
        if answer.is_ok_and(|status| (200..300).contains(&status)) {
            let _ = self.histogram.record(since.elapsed().as_micros() as u64);
        } else {
            self.errors += 1;
        }
    }

    fn add(&mut self, other: &Seen) {
        let _ = self.histogram.add(&other.histogram);
        self.errors += other.errors;
    }
}

/// Runs a request loop per connection of `server`, side by side until all end, and sums what they saw since
/// `started`, with the CPU time the server and the whole machine used meanwhile. The connections come back to
/// `server`, and its next round starts in the keys after the requests of this one.
async fn run_loops<F>(
    started: Instant,
    server: &mut Server,
    request_loop: impl Fn(usize, Connection) -> F,
) -> anyhow::Result<Tally>
where
    F: std::future::Future<Output = (Seen, Connection)> + Send + 'static,
{
    let (cpu, machine) = (cpu_of(server.pid), MachineCpu::now());
    let loops = std::mem::take(&mut server.connections)
        .into_iter()
        .enumerate()
        .map(|(n, connection)| tokio::spawn(request_loop(n, connection)));
    let mut tally = Tally::default();
    for finished in futures::future::join_all(loops).await {
        // A loop only ends by returning: a panic in one is the bench's bug, not a figure to leave out (and an error,
        // so that the bench's database, stream and keys are still removed).
        let (seen, connection) = finished.context("a request loop panicked")?;
        tally.seen.add(&seen);
        server.connections.push(connection);
    }
    tally.elapsed = started.elapsed();
    tally.server_cpu = cpu_of(server.pid).zip(cpu).map(|(now, before)| now.saturating_sub(before));
    tally.machine = MachineCpu::now().zip(machine).map(|(now, before)| now.since(before));
    server.next_key += (tally.seen.histogram.len() + tally.seen.errors) as usize;
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{counter_total, open_loop, Connection, Server, Target};

    #[tokio::test]
    async fn a_request_held_back_by_a_slow_answer_counts_from_its_scheduled_time() {
        // One connection, a request due every millisecond, answers that take 20 ms: request i goes out about 20·i ms
        // after its time, so the last ones count hundreds of milliseconds, not the 20 the server took for each.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port on loopback");
        let port = listener.local_addr().expect("a bound listener has an address").port();
        // The server runs in this process.
        let connections = vec![Connection::new(Target::auth(port))];
        let mut server = Server { pid: std::process::id(), connections, next_key: 0 };
        let slow = axum::Router::new().fallback(|| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            axum::http::StatusCode::OK
        });
        tokio::spawn(async move { axum::serve(listener, slow).await });
        let keys = Arc::new(vec!["Bearer k".to_owned()]);

        let tally = open_loop(&mut server, &keys, 1000, Duration::from_millis(30)).await.expect("a round");

        assert_eq!((tally.seen.histogram.len(), tally.seen.errors), (30, 0));
        let slowest = tally.seen.histogram.max();
        assert!(slowest >= 400_000, "the last request counted {slowest} µs");
        assert!(tally.server_cpu.is_some(), "the server's CPU time is read from /proc");
        assert!(tally.machine.is_some(), "the machine's CPU time is read from /proc");
    }

    #[test]
    fn a_counter_total_sums_its_series_and_nothing_else() {
        let exposition = "# HELP tollgate_ratelimit_degraded_total Decisions made without Redis.\n\
                          # TYPE tollgate_ratelimit_degraded_total counter\n\
                          tollgate_ratelimit_degraded_total{policy=\"local\"} 612\n\
                          tollgate_ratelimit_degraded_total{policy=\"open\"} 3\n\
                          tollgate_ratelimit_degraded_totals 1000\n\
                          tollgate_ratelimit_decisions_total{limit=\"org\",result=\"allowed\"} 9\n";
        assert_eq!(counter_total(exposition, "tollgate_ratelimit_degraded_total"), 615);
        assert_eq!(counter_total("tollgate_x 2\n", "tollgate_ratelimit_degraded_total"), 0);
        // One series alone, named with its labels.
        let lookups =
            "tollgate_key_lookups_total{source=\"cache\"} 7\ntollgate_key_lookups_total{source=\"database\"} 2\n";
        assert_eq!(counter_total(lookups, "tollgate_key_lookups_total{source=\"database\"}"), 2);
    }
}
