//! An isolated Tollgate per test: its own database, stream, subject prefix and Redis prefix on the shared servers,
//! with the validator and workers run in-process on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_shared::admin::{self, Actor, NewKey, NewOrg};
use tollgate_shared::config::{
    ConnectionArgs, FsyncPolicy, LimiterArgs, NamespaceArgs, ServerUrl, SpoolFullPolicy, ValidatorArgs, WorkerArgs,
};
use tollgate_shared::domain::Outcome;
use tollgate_shared::domain::{LimitSetting, PlanName, Role, TierName};
use tollgate_shared::event::UsageEvent;
use tollgate_shared::key::{ApiKey, KeyEnv};
use tollgate_shared::topology::Topology;
use tollgate_shared::{connect, listen};

use crate::servers::free_port;

pub const DATABASE_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

pub struct TestEnv {
    pub database: String,
    pub database_url: ServerUrl,
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub topology: Topology,
    /// Where its database and streams are, for [`TestEnv::cleanup`].
    database_server: String,
    nats_url: String,
    cleaned: bool,
}

/// A running service: cancel `shutdown` and await `task` to stop it gracefully.
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("service task panicked").expect("service failed");
    }
}

pub struct RunningValidator {
    pub address: SocketAddr,
    pub service: Running,
}

impl RunningValidator {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// The status `/v1/auth` answers for `key`.
    pub async fn auth_status(&self, client: &reqwest::Client, key: &ApiKey) -> reqwest::StatusCode {
        client.get(self.url("/v1/auth")).bearer_auth(key.expose()).send().await.expect("request").status()
    }

    /// `count` requests for `key` at once: their statuses, and how long the last answer took.
    pub async fn auth_at_once(
        &self,
        client: &reqwest::Client,
        key: &ApiKey,
        count: usize,
    ) -> (Vec<reqwest::StatusCode>, Duration) {
        let started = std::time::Instant::now();
        let statuses = futures::future::join_all((0..count).map(|_| self.auth_status(client, key))).await;
        (statuses, started.elapsed())
    }
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        TestEnv::on_servers(DATABASE_SERVER, NATS_URL).await
    }

    /// Like [`TestEnv::new`], with NATS at `nats_url` (a private server for fault tests).
    pub async fn with_nats(nats_url: &str) -> TestEnv {
        TestEnv::on_servers(DATABASE_SERVER, nats_url).await
    }

    /// Like [`TestEnv::new`], with the database on another PostgreSQL server (e.g. a `PrivatePostgres`).
    pub async fn on_postgres(database_server: &str) -> TestEnv {
        TestEnv::on_servers(database_server, NATS_URL).await
    }

    async fn on_servers(database_server: &str, nats_url: &str) -> TestEnv {
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("tollgate_it_{id}");
        let database_url: ServerUrl = format!("{database_server}/{database}").parse().expect("valid url");
        let pool = connect::postgres_migrated(&database_url, 8).await.expect("test database");
        let nats = connect::nats(&nats_url.parse().expect("url")).await.expect("nats");
        let namespace = NamespaceArgs {
            stream: format!("IT_{id}"),
            subject_prefix: format!("it{id}"),
            redis_prefix: format!("it:{id}:"),
        };
        let topology = Topology::new(&namespace);
        TestEnv {
            database,
            database_url,
            pool,
            nats,
            topology,
            database_server: database_server.to_owned(),
            nats_url: nats_url.to_owned(),
            cleaned: false,
        }
    }

    /// A validator's settings for tests, with a spool of its own (the lock refuses sharing) inside this test's spool
    /// directory, which `cleanup` removes. Redis gets 1 s (the most there is) rather than 50 ms: tests run side by side
    /// on a small machine, and a limit's exact count must not turn into a local one because Redis was slow once (the
    /// tests of Redis trouble set their own timeouts).
    pub fn validator_args(&self) -> ValidatorArgs {
        ValidatorArgs {
            listen: "127.0.0.1:0".parse().expect("addr"),
            trusted_proxies: "127.0.0.0/8".parse().expect("nets"),
            connections: ConnectionArgs {
                max_connections: 1_000,
                read_timeout: Duration::from_secs(65),
                shutdown_grace: Duration::from_secs(20),
            },
            shutdown_delay: Duration::ZERO,
            event_queue: 10_000,
            key_cache: 10_000,
            negative_cache_ttl: Duration::from_secs(30),
            key_refresh: Duration::from_millis(200),
            key_recheck: Duration::from_secs(300),
            limits: LimiterArgs {
                redis_timeout: tollgate_shared::connect::REDIS_RESPONSE_TIMEOUT,
                ..LimiterArgs::defaults()
            },
            spool_dir: self.spool_dir().join(Uuid::new_v4().simple().to_string()),
            spool_fsync: FsyncPolicy::Always,
            spool_max_bytes: 64 << 20,
            spool_full: SpoolFullPolicy::Block,
            publish_timeout: Duration::from_secs(2),
        }
    }

    /// This test's spool directory (removed by `cleanup`); a validator restarted with it finds what the last left.
    pub fn spool_dir(&self) -> PathBuf {
        std::env::temp_dir().join("tollgate-it-spool").join(&self.topology.stream)
    }

    pub fn worker_args() -> WorkerArgs {
        WorkerArgs { batch_messages: 50, batch_wait: Duration::from_millis(20), batch_events: 5000, worker_tasks: 1 }
    }

    pub async fn start_validator(&self) -> RunningValidator {
        self.start_validator_with(self.validator_args(), REDIS_URL).await
    }

    /// A validator with these settings, on this Redis (its own connection, as a separate process would have).
    pub async fn start_validator_with(&self, args: ValidatorArgs, redis_url: &str) -> RunningValidator {
        self.start_validator_on(args, redis_url, self.nats.clone()).await
    }

    /// [`TestEnv::start_validator_with`] on a NATS client of its own.
    pub async fn start_validator_on(
        &self,
        args: ValidatorArgs,
        redis_url: &str,
        nats: async_nats::Client,
    ) -> RunningValidator {
        let listener = listen::bind(([127, 0, 0, 1], 0).into()).expect("bind");
        let address = listener.local_addr().expect("address");
        let connections = tollgate_validator::Connections {
            pool: self.pool.clone(),
            redis: connect::redis(&redis_url.parse().expect("url")).await.expect("redis").into(),
            nats,
        };
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(tollgate_validator::run(args, self.topology.clone(), connections, listener, shutdown.clone()));
        RunningValidator { address, service: Running { shutdown, task } }
    }

    pub async fn start_worker(&self) -> Running {
        let connections = tollgate_worker::Connections {
            pool: self.pool.clone(),
            nats: self.nats.clone(),
            redis: connect::redis(&REDIS_URL.parse().expect("url")).await.expect("redis").into(),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tollgate_worker::run(
            Self::worker_args(),
            self.topology.clone(),
            self.topology.redis_prefix.clone(),
            connections,
            shutdown.clone(),
        ));
        Running { shutdown, task }
    }

    /// An organization with no rate limit to get in the way, and its slug.
    pub async fn org(&self) -> String {
        let slug = format!("org-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let new = NewOrg {
            name: "Test org".into(),
            slug: Some(slug.clone()),
            plan: PlanName::from_static("pro"),
            rate_limit_per_minute: Some(LimitSetting::Unlimited),
            monthly_request_limit: None,
            max_api_keys: None,
        };
        admin::create_org(&self.pool, new).await.expect("create org");
        slug
    }

    pub async fn key(&self, org: &str) -> (Uuid, ApiKey) {
        self.key_with(org, |_| {}).await
    }

    pub async fn key_with(&self, org: &str, edit: impl FnOnce(&mut NewKey)) -> (Uuid, ApiKey) {
        let mut new = new_key(org);
        edit(&mut new);
        let (info, key) = admin::create_key(&self.pool, &Actor("test".into()), new, KeyEnv::Test).await.expect("key");
        (info.id, key)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let as_bigint = format!("SELECT ({sql})::int8");
        sqlx::query_scalar::<_, Option<i64>>(&as_bigint).fetch_one(&self.pool).await.expect(sql).unwrap_or(0)
    }

    /// Waits until `sql` returns `expected`, failing with the last value after 45 s: longer than the consumer's
    /// 30 s ack wait, so a message that had to be re-delivered still counts as arriving.
    pub async fn wait_for_count(&self, sql: &str, expected: i64) {
        let last = wait_until(Duration::from_secs(45), || async { self.count(sql).await }, |n| *n == expected).await;
        assert_eq!(last, expected, "{sql}");
    }

    /// Waits until `sql` returns `expected`, failing with the last value after `timeout`.
    pub async fn wait_for_count_within(&self, sql: &str, expected: i64, timeout: Duration) {
        let last = wait_until(timeout, || async { self.count(sql).await }, |n| *n == expected).await;
        assert_eq!(last, expected, "{sql}");
    }

    /// Removes everything the test made: its database, streams, Redis keys and spool. A test that panics before
    /// calling this has it done when its `TestEnv` is dropped (stop its child processes first: a worker still
    /// running would make the streams again).
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        self.remove().await;
        self.cleaned = true;
    }

    async fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(self.spool_dir()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup: cannot remove {}: {e}", self.spool_dir().display());
            }
        }
        let redis_url = REDIS_URL.parse().expect("a valid constant");
        if let Err(e) = self.topology.delete_redis_keys(&redis_url).await {
            eprintln!("cleanup: cannot delete the Redis keys under {}: {e}", self.topology.redis_prefix);
        }
        // A connection of its own: when dropped after a panic, the test's runtime no longer drives its client.
        let nats = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&self.nats_url)).await;
        match nats {
            Ok(Ok(nats)) => self.topology.delete(&async_nats::jetstream::new(nats)).await,
            // A private server already stopped takes its streams with it.
            _ => eprintln!("cleanup: NATS at {} does not answer; its streams stay", self.nats_url),
        }
        // Never a panic here: when dropped after one, a second would abort the whole test binary.
        let drop_database = async {
            let server: ServerUrl = format!("{}/postgres", self.database_server).parse().map_err(anyhow::Error::msg)?;
            let admin = connect::postgres(&server, 1).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database)).execute(&admin).await?;
            Ok::<_, anyhow::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(20), drop_database).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup: cannot drop the database {}: {e}", self.database),
            Err(_) => eprintln!("cleanup: dropping the database {} took over 20 s", self.database),
        }
    }
}

impl Drop for TestEnv {
    /// A test that panicked (or forgot to) leaves nothing behind on the shared servers either.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(self.remove());
            });
        });
    }
}

/// A test key of `org`: a user's, unlimited, with scope `read`.
pub fn new_key(org: &str) -> NewKey {
    NewKey {
        org: org.into(),
        name: "test key".into(),
        role: Role::User,
        tier: TierName::from_static("unlimited"),
        scopes: vec!["read".into()],
        custom_rate_limit_per_minute: None,
        expires_at: None,
    }
}

/// Polls `probe` until `done` holds or `timeout` passes; returns the last value seen.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let value = probe().await;
        if done(&value) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A `tollgate` service run as a child process, so that a test can kill it with SIGKILL or read what the whole process
/// exports. Killed on drop.
pub struct ServiceProcess {
    child: Option<std::process::Child>,
}

impl ServiceProcess {
    /// SIGKILL: no shutdown, no flush, no ack.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl ServiceProcess {
    /// Sends SIGTERM, as an orchestrator stopping it does.
    pub fn terminate(&self) {
        let child = self.child.as_ref().expect("running");
        let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(status.expect("kill").success(), "SIGTERM sent");
    }

    /// How it exited, if it did within `patience`.
    pub async fn exit_within(&mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("its status") {
                return Some(status);
            }
            if started.elapsed() >= patience {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tollgate validator` child process (see [`TestEnv::spawn_validator_process`]). Killed on drop.
pub struct ValidatorProcess {
    pub port: u16,
    pub metrics_port: u16,
    pub process: ServiceProcess,
}

impl ValidatorProcess {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// Waits until it answers HTTP: it binds its port only after connecting to its servers. Fails at once if it exited
    /// meanwhile.
    pub async fn answering(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client.get(self.url("/healthz")).send().await.is_ok() {
                return;
            }
            if let Some(status) = self.process.exit_within(Duration::ZERO).await {
                panic!("the validator exited ({status}) before answering on port {}", self.port);
            }
            assert!(Instant::now() < deadline, "the validator does not answer on port {} after 20 s", self.port);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The value of one series (`name` or `name{labels}`, as exported) on its metrics endpoint, if it is exported.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let exposition = reqwest::get(self.metrics_url()).await.expect("scrape").text().await.expect("exposition");
        series_value(&exposition, series)
    }
}

/// The value of `series` (`name{labels}` exactly as exported) in a Prometheus exposition, if it is there.
pub fn series_value(exposition: &str, series: &str) -> Option<f64> {
    let value = exposition.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))?;
    Some(value.parse().expect("a number"))
}

/// Verifies sent in a loop by a few clients until stopped; counts the 200s they saw.
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<i64>>,
}

impl Load {
    /// `clients` concurrent loops of `/v1/auth` with `key`.
    pub fn start(validator: &RunningValidator, key: &ApiKey, clients: usize) -> Load {
        let stop = CancellationToken::new();
        let http = reqwest::Client::new();
        let tasks = (0..clients)
            .map(|_| {
                let request = http.get(validator.url("/v1/auth")).bearer_auth(key.expose());
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut ok = 0;
                    while !stop.is_cancelled() {
                        let request = request.try_clone().expect("a body-less request clones");
                        if let Ok(response) = request.send().await {
                            assert!(
                                response.status() == reqwest::StatusCode::OK,
                                "verify answered {}",
                                response.status()
                            );
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients; the number of 200s they saw.
    pub async fn stop(self) -> i64 {
        self.stop.cancel();
        let mut ok = 0;
        for task in self.tasks {
            ok += task.await.expect("load client panicked");
        }
        ok
    }
}

impl TestEnv {
    /// Points a `tollgate` process at this environment's database, stream and prefixes, with its metrics on a free port.
    pub fn servers_and_namespace<'c>(
        &self,
        command: &'c mut std::process::Command,
        nats_url: &str,
    ) -> &'c mut std::process::Command {
        command
            .env("DATABASE_URL", self.database_url.expose())
            .env("NATS_URL", nats_url)
            .env("REDIS_URL", REDIS_URL)
            .env("TOLLGATE_STREAM", &self.topology.stream)
            .env("TOLLGATE_SUBJECT_PREFIX", &self.topology.subject_prefix)
            .env("TOLLGATE_REDIS_PREFIX", &self.topology.redis_prefix)
            .env("TOLLGATE_METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
    }

    /// Starts `tollgate worker` as a child process on this environment's database, stream and prefixes.
    pub fn spawn_worker_process(&self, nats_url: &str) -> ServiceProcess {
        self.spawn_service("worker", nats_url, &[("TOLLGATE_BATCH_WAIT", "20ms".into())])
    }

    /// Starts `tollgate validator` as a child process on this environment's servers and namespace: its API and its
    /// metrics on free ports, its spool in this test's directory, with `settings` (environment variables) on top.
    pub fn spawn_validator_process(&self, settings: &[(&str, String)]) -> ValidatorProcess {
        self.spawn_validator_process_logging(settings, std::process::Stdio::null())
    }

    /// [`TestEnv::spawn_validator_process`], with its log lines (stderr) going to `log`.
    pub fn spawn_validator_process_logging(
        &self,
        settings: &[(&str, String)],
        log: std::process::Stdio,
    ) -> ValidatorProcess {
        self.spawn_validator_process_on(NATS_URL, settings, log)
    }

    /// [`TestEnv::spawn_validator_process_logging`] on the NATS server at `nats_url`.
    pub fn spawn_validator_process_on(
        &self,
        nats_url: &str,
        settings: &[(&str, String)],
        log: std::process::Stdio,
    ) -> ValidatorProcess {
        let (port, metrics_port) = (free_port(), free_port());
        let mut all = vec![
            ("TOLLGATE_LISTEN", format!("127.0.0.1:{port}")),
            ("TOLLGATE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}")),
            ("TOLLGATE_SPOOL_DIR", self.spool_dir().display().to_string()),
        ];
        all.extend_from_slice(settings);
        let process = self.spawn_service_logging("validator", nats_url, &all, log);
        ValidatorProcess { port, metrics_port, process }
    }

    /// Starts `tollgate SERVICE` as a child process on this environment's servers and namespace, with `settings`
    /// (environment variables) on top.
    pub fn spawn_service(&self, service: &str, nats_url: &str, settings: &[(&str, String)]) -> ServiceProcess {
        self.spawn_service_logging(service, nats_url, settings, std::process::Stdio::null())
    }

    pub fn spawn_service_logging(
        &self,
        service: &str,
        nats_url: &str,
        settings: &[(&str, String)],
        log: std::process::Stdio,
    ) -> ServiceProcess {
        let child = self
            .servers_and_namespace(std::process::Command::new(env!("CARGO_BIN_EXE_tollgate")).arg(service), nats_url)
            .envs(settings.iter().map(|(name, value)| (name, value)))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start tollgate {service}: {e}"));
        ServiceProcess { child: Some(child) }
    }

    /// Creates the usage stream and the workers' consumer with a short ack wait, so that what a killed worker held
    /// is re-delivered quickly.
    pub async fn short_ack_wait(&self, ack_wait: Duration) {
        self.workers_consumer_with(|config| {
            config.ack_wait = ack_wait;
            config.max_deliver = -1;
            config.max_ack_pending = 100_000;
        })
        .await;
    }

    /// Creates the usage stream and the workers' consumer as an operator might have edited it (workers find the
    /// consumer and use it as it is).
    pub async fn workers_consumer_with(&self, edit: impl FnOnce(&mut async_nats::jetstream::consumer::pull::Config)) {
        let js = async_nats::jetstream::new(self.nats.clone());
        let stream = self.topology.ensure_usage_stream(&js).await.expect("usage stream");
        let mut config = async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(self.topology.workers_consumer()),
            filter_subject: self.topology.usage_filter(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        };
        edit(&mut config);
        stream.create_consumer(config).await.expect("workers consumer");
    }

    /// The quota counters of this environment's Redis prefix.
    pub async fn quota_counters(&self) -> tollgate_worker::QuotaCounters {
        let redis = connect::redis(&REDIS_URL.parse().expect("url")).await.expect("redis");
        tollgate_worker::QuotaCounters::new(redis, self.topology.redis_prefix.clone())
    }

    /// After the pipeline is quiet: `allowed` allowed rows in api_usage, in usage_hourly and in billing_periods, no
    /// event twice, the billing invariant for every org and month, and quota counters equal to PostgreSQL.
    pub async fn assert_exactly_once(&self, allowed: i64) {
        self.wait_for_count("SELECT count(*) FROM api_usage WHERE outcome = 'allowed'", allowed).await;
        self.wait_for_count("SELECT sum(allowed) FROM usage_hourly", allowed).await;
        self.wait_for_count("SELECT sum(requests) FROM billing_periods", allowed).await;
        assert_eq!(self.count("SELECT count(*) - count(DISTINCT event_id) FROM api_usage").await, 0, "an event twice");
        let mut quota = self.quota_counters().await;
        let report = tollgate_worker::reconcile::reconcile(&self.pool, Some(&mut quota), Default::default(), false)
            .await
            .expect("reconcile");
        assert_eq!(report.violations, 0, "billing invariant: {:?}", report.periods);
        let drift = wait_until(
            Duration::from_secs(5),
            || async {
                let mut quota = self.quota_counters().await;
                tollgate_worker::reconcile::reconcile(&self.pool, Some(&mut quota), Default::default(), false)
                    .await
                    .expect("reconcile")
                    .drift_units
            },
            |drift| *drift == Some(0),
        )
        .await;
        assert_eq!(drift, Some(0), "quota counters differ from PostgreSQL");
    }

    /// Waits until `sql` returns at least `minimum`, failing after 45 s.
    pub async fn wait_for_count_at_least(&self, sql: &str, minimum: i64) {
        let last = wait_until(Duration::from_secs(45), || async { self.count(sql).await }, |n| *n >= minimum).await;
        assert!(last >= minimum, "{sql}: {last} < {minimum}");
    }
}

/// A usage event as the validator would publish it, for tests that feed the stream directly.
pub fn usage_event(org_id: Uuid, key_id: Uuid, outcome: Outcome, units: u32) -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        ts: chrono::Utc::now(),
        org_id,
        key_id,
        outcome,
        method: "POST".into(),
        path: "/v1/things".into(),
        client_ip: Some("2001:db8::7".parse().expect("ip")),
        user_agent: Some("test".into()),
        request_id: Some("r-1".into()),
        units,
        latency_us: 42,
        shadow_outcome: None,
    }
}
