//! `tollgate bench pipeline`: the worker side's throughput, measured end to end on the real servers.
//!
//! It creates a database, stream and Redis prefix of its own, publishes synthetic events straight to the stream at
//! the target rate (several events per message, like the validator's publisher), runs workers in this process,
//! and measures committed rows/s and lag (event time → commit, HDR histogram). Then, in the same run, it loads the
//! same number of rows of the same shape by raw binary COPY into the same table (no dedupe, rollups or billing) as
//! the ceiling, and reports bytes on disk per usage row. Everything it created is removed at the end.

use std::future::IntoFuture;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_shared::codec;
use tollgate_shared::config::{NamespaceArgs, ServerArgs, ServerUrl};
use tollgate_shared::connect;
use tollgate_shared::domain::Outcome;
use tollgate_shared::event::UsageEvent;
use tollgate_shared::topology::Topology;

use super::namespace::BenchNamespace;
use crate::cli::BenchPipelineArgs;
use crate::output::{fields, print};

/// Publish acks awaited at once.
const PUBLISH_IN_FLIGHT: usize = 512;
/// The first seconds are not counted in the sustained rate (connections, partitions, JIT-like warm-up of caches).
const WARM_UP: Duration = Duration::from_secs(2);
/// How long to wait for the workers to drain the stream after the last publish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// What `bench pipeline` measured.
#[derive(Debug, Serialize)]
pub struct PipelineReport {
    pub target_rate: u64,
    pub published_events: u64,
    pub published_rate: f64,
    pub committed_rows: u64,
    /// Rows committed per second between the end of the warm-up and the end of publishing.
    pub sustained_rows_per_second: f64,
    /// Seconds the workers needed after the last publish to commit everything.
    pub drain_seconds: f64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub copy_ceiling_rows_per_second: f64,
    /// sustained / ceiling.
    pub ceiling_fraction: f64,
    pub bytes_per_row: f64,
    /// Of which indexes.
    pub index_bytes_per_row: f64,
    pub worker_tasks: u16,
    pub batch_events: usize,
    pub rows_checked: u64,
}

/// Runs the benchmark on a database, stream and Redis prefix of its own, and removes them afterwards.
pub async fn pipeline(servers: &ServerArgs, json: bool, args: BenchPipelineArgs) -> anyhow::Result<()> {
    let bench = BenchNamespace::new(servers);
    let nats = connect::nats(&servers.nats_url).await?;
    eprintln!("bench: database {}, stream {}", bench.database, bench.topology.stream);
    let report =
        bench.run(servers, run(servers, &bench.database_url, &bench.names, &bench.topology, nats, &args)).await?;
    print(json, &report, show)
}

async fn run(
    servers: &ServerArgs,
    database_url: &ServerUrl,
    namespace: &NamespaceArgs,
    topology: &Topology,
    nats: async_nats::Client,
    args: &BenchPipelineArgs,
) -> anyhow::Result<PipelineReport> {
    let pool = connect::postgres_migrated(database_url, (usize::from(args.worker.worker_tasks) * 2 + 2) as u32).await?;
    let js = jetstream::new(nats.clone());
    topology.ensure_worker_side(&js).await?;
    let keys = create_keys(&pool, args.orgs).await?;

    let committed = Arc::new(AtomicU64::new(0));
    let committed_at_warm_up = Arc::new(AtomicU64::new(0));
    let lag = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let observer: tollgate_worker::CommitObserver = {
        let committed = committed.clone();
        let lag = lag.clone();
        Arc::new(move |events: &[UsageEvent], at| {
            committed.fetch_add(events.len() as u64, Ordering::Relaxed);
            // A poisoned lock only means another observer panicked; the histogram is still usable.
            let mut lag = lag.lock().unwrap_or_else(|e| e.into_inner());
            for event in events {
                let micros = (at - event.ts).num_microseconds().unwrap_or(0).max(1);
                lag.saturating_record(micros as u64);
            }
        })
    };
    let shutdown = CancellationToken::new();
    // A bench stopped midway drops this future: the workers stop with it (aborted with their set), before the
    // bench's streams and keys are removed, rather than make them again.
    let mut workers = tokio::task::JoinSet::new();
    let redis = connect::redis(&servers.redis_url).await?;
    for _ in 0..args.worker.worker_tasks {
        let connections =
            tollgate_worker::Connections { pool: pool.clone(), nats: nats.clone(), redis: redis.clone().into() };
        workers.spawn(tollgate_worker::run_observed(
            args.worker.clone(),
            topology.clone(),
            namespace.redis_prefix.clone(),
            connections,
            Some(observer.clone()),
            shutdown.clone(),
        ));
    }

    // Publish at the target rate. Each event is stamped with when it was due, so that the lag counts the time the
    // publisher fell behind too (held back by JetStream's acks).
    let started = Instant::now();
    let started_at = Utc::now();
    let publish_for = Duration::from_secs(args.seconds);
    let subject = topology.usage_subject();
    let mut in_flight = FuturesUnordered::new();
    let mut published: u64 = 0;
    let mut warm_up_marked = false;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while started.elapsed() < publish_for {
        tick.tick().await;
        if !warm_up_marked && started.elapsed() >= WARM_UP {
            committed_at_warm_up.store(committed.load(Ordering::Relaxed), Ordering::Relaxed);
            warm_up_marked = true;
        }
        let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while published + args.events_per_message as u64 <= due {
            let due_at =
                |n: u64| started_at + chrono::TimeDelta::microseconds((n as f64 * 1e6 / args.rate as f64) as i64);
            let batch: Vec<UsageEvent> =
                (published..published + args.events_per_message as u64).map(|n| synthetic(&keys, due_at(n))).collect();
            let n = batch.len() as u64;
            let ack = js.publish(subject.clone(), codec::encode_batch(batch).into()).await?;
            in_flight.push(ack.into_future());
            published += n;
            while in_flight.len() >= PUBLISH_IN_FLIGHT {
                if let Some(ack) = in_flight.next().await {
                    ack.context("JetStream did not store a benchmark message")?;
                }
            }
        }
    }
    let publish_seconds = started.elapsed().as_secs_f64();
    let committed_at_end = committed.load(Ordering::Relaxed);
    while let Some(ack) = in_flight.next().await {
        ack.context("JetStream did not store a benchmark message")?;
    }
    let drain_started = Instant::now();
    while committed.load(Ordering::Relaxed) < published && drain_started.elapsed() < DRAIN_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    shutdown.cancel();
    while let Some(worker) = workers.join_next().await {
        worker.context("a worker panicked")??;
    }
    let committed_rows = committed.load(Ordering::Relaxed);
    anyhow::ensure!(committed_rows >= published, "the workers committed {committed_rows} of {published} events");

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM api_usage").fetch_one(&pool).await?;
    let billed: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(requests), 0)::int8 FROM billing_periods").fetch_one(&pool).await?;
    let allowed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_usage WHERE outcome = 'allowed'").fetch_one(&pool).await?;
    anyhow::ensure!(rows as u64 == published, "api_usage holds {rows} rows for {published} events");
    anyhow::ensure!(billed == allowed, "billing counts {billed} requests for {allowed} allowed rows");
    let (bytes_per_row, index_bytes_per_row) = bytes_per_row(&pool).await?;

    let ceiling = copy_ceiling(&pool, &keys, published.min(2_000_000) as usize, args).await?;
    let sustained = (committed_at_end - committed_at_warm_up.load(Ordering::Relaxed)) as f64
        / (publish_seconds - WARM_UP.as_secs_f64()).max(0.001);
    pool.close().await;
    let lag = lag.lock().unwrap_or_else(|e| e.into_inner());
    Ok(PipelineReport {
        target_rate: args.rate,
        worker_tasks: args.worker.worker_tasks,
        batch_events: args.worker.batch_events,
        published_events: published,
        published_rate: published as f64 / publish_seconds,
        committed_rows,
        sustained_rows_per_second: sustained,
        drain_seconds,
        lag_p50_ms: lag.value_at_quantile(0.50) as f64 / 1000.0,
        lag_p99_ms: lag.value_at_quantile(0.99) as f64 / 1000.0,
        lag_max_ms: lag.max() as f64 / 1000.0,
        copy_ceiling_rows_per_second: ceiling,
        ceiling_fraction: sustained / ceiling,
        bytes_per_row,
        index_bytes_per_row,
        rows_checked: rows as u64,
    })
}

/// Organizations on the pro plan with one key each; returns (org, key) pairs.
async fn create_keys(pool: &sqlx::PgPool, orgs: usize) -> anyhow::Result<Vec<(Uuid, Uuid)>> {
    let keys: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "WITH o AS (
             INSERT INTO organizations (id, name, slug, plan, rate_limit_per_minute)
             SELECT gen_random_uuid(), 'bench ' || n, 'bench-' || n, 'pro', NULL FROM generate_series(1, $1) n
             RETURNING id
         )
         INSERT INTO api_keys (id, org_id, name, prefix, key_hint, key_hash, rate_limit_tier)
         SELECT gen_random_uuid(), id, 'bench', 'tg_test_bench', 'xxxx', sha256(id::text::bytea), 'unlimited' FROM o
         RETURNING org_id, id",
    )
    .bind(orgs.max(1) as i32)
    .fetch_all(pool)
    .await?;
    Ok(keys)
}

/// A typical event: an allowed GET with a short path, an IPv4 client and a short user agent; 2% rate-limited.
fn synthetic(keys: &[(Uuid, Uuid)], ts: DateTime<Utc>) -> UsageEvent {
    let mut rng = rand::rng();
    let (org_id, key_id) = keys[rng.random_range(0..keys.len())];
    UsageEvent {
        event_id: Uuid::now_v7(),
        ts,
        org_id,
        key_id,
        outcome: if rng.random_ratio(2, 100) { Outcome::RateLimited } else { Outcome::Allowed },
        method: "GET".into(),
        path: format!("/v1/orders/{}", rng.random_range(1..100_000)),
        client_ip: Some(IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))),
        user_agent: Some("python-requests/2.31.0".into()),
        request_id: None,
        units: 1,
        latency_us: rng.random_range(20..400),
        shadow_outcome: None,
    }
}

/// Bytes on disk per api_usage row over every partition: everything (table, TOAST and indexes), and the
/// indexes alone.
async fn bytes_per_row(pool: &sqlx::PgPool) -> anyhow::Result<(f64, f64)> {
    let (total, indexes, rows): (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8,
                coalesce(sum(pg_indexes_size(inhrelid)), 0)::int8,
                (SELECT count(*) FROM api_usage)
         FROM pg_inherits WHERE inhparent = 'api_usage'::regclass",
    )
    .fetch_one(pool)
    .await?;
    let rows = rows.max(1) as f64;
    Ok((total as f64 / rows, indexes as f64 / rows))
}

/// Rows per second of plain binary COPY of `rows` fresh rows of the same shape into the same table, in the
/// workers' batch size, from as many connections as there are worker tasks.
async fn copy_ceiling(
    pool: &sqlx::PgPool,
    keys: &[(Uuid, Uuid)],
    rows: usize,
    args: &BenchPipelineArgs,
) -> anyhow::Result<f64> {
    let batch = args.worker.batch_events.max(1);
    let events: Vec<UsageEvent> = (0..rows).map(|_| synthetic(keys, Utc::now())).collect();
    let mut user_agents = tollgate_worker::UserAgents::default();
    user_agents.resolve(pool, &events.iter().collect::<Vec<_>>()).await?;
    let encoded: Vec<Vec<u8>> = events
        .chunks(batch)
        .map(|chunk| tollgate_worker::encode(&chunk.iter().collect::<Vec<_>>(), &user_agents))
        .collect();
    let statement = tollgate_worker::copy_statement("api_usage");
    let started = Instant::now();
    let workers = usize::from(args.worker.worker_tasks);
    let mut tasks = Vec::new();
    for share in 0..workers {
        let mine: Vec<Vec<u8>> = encoded.iter().skip(share).step_by(workers).cloned().collect();
        let pool = pool.clone();
        let statement = statement.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in mine {
                let mut tx = pool.begin().await?;
                let mut copy = tx.copy_in_raw(&statement).await?;
                copy.send(chunk).await?;
                copy.finish().await?;
                tx.commit().await?;
            }
            Ok::<(), sqlx::Error>(())
        }));
    }
    for task in tasks {
        task.await.context("a COPY task panicked")??;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

fn show(report: &PipelineReport) -> String {
    fields(&[
        ("target rate", format!("{} events/s", report.target_rate)),
        ("published", format!("{} events ({:.0} events/s)", report.published_events, report.published_rate)),
        (
            "sustained commit rate",
            format!("{:.0} rows/s (after {} s warm-up)", report.sustained_rows_per_second, WARM_UP.as_secs()),
        ),
        ("drain after publishing", format!("{:.2} s", report.drain_seconds)),
        (
            "lag p50 / p99 / max",
            format!("{:.1} / {:.1} / {:.1} ms", report.lag_p50_ms, report.lag_p99_ms, report.lag_max_ms),
        ),
        ("raw binary COPY ceiling", format!("{:.0} rows/s", report.copy_ceiling_rows_per_second)),
        (
            "fraction of ceiling",
            format!(
                "{:.0}%{}",
                report.ceiling_fraction * 100.0,
                if report.drain_seconds < 1.0 { " (workers kept up: raise --rate to find their maximum)" } else { "" }
            ),
        ),
        (
            "bytes per usage row",
            format!("{:.0} B (table + indexes; indexes {:.0} B)", report.bytes_per_row, report.index_bytes_per_row),
        ),
        ("workers", format!("{} tasks, batches of up to {} events", report.worker_tasks, report.batch_events)),
        ("rows checked", format!("{} (billing = allowed rows)", report.rows_checked)),
    ])
}
