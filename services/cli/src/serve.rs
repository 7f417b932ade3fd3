//! `tollgate up`, `tollgate validator` and `tollgate worker`: compose the services in one process and shut them down
//! gracefully on SIGINT/SIGTERM.

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use tollgate_shared::admin::{self, Actor, NewKey, NewOrg};
use tollgate_shared::config::{MetricsArgs, NamespaceArgs, ServerArgs, ValidatorArgs, WorkerArgs};
use tollgate_shared::domain::{LimitSetting, PlanName, Role, TierName};
use tollgate_shared::key::KeyEnv;
use tollgate_shared::topology::Topology;
use tollgate_shared::{connect, listen};

/// How often a worker process compares this month's quota counters with PostgreSQL (`tollgate_quota_drift_units`).
const DRIFT_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Which services this process runs.
pub struct Roles {
    pub validator: Option<ValidatorArgs>,
    pub worker: Option<WorkerArgs>,
    pub demo: bool,
}

pub async fn serve(
    servers: &ServerArgs,
    namespace: &NamespaceArgs,
    metrics: &MetricsArgs,
    roles: Roles,
) -> anyhow::Result<()> {
    raise_open_files_limit();
    // Each worker loop holds a connection while it writes: beside them, the validator's key reads (its key refresher
    // has one of its own).
    let connections = 16.max(8 + roles.worker.as_ref().map_or(0, |w| u32::from(w.worker_tasks)));
    let pool = connect::postgres_migrated(&servers.database_url, connections).await?;
    match connect::newer_migrations(&pool).await {
        Ok(newer) if !newer.is_empty() => tracing::warn!(
            migrations = newer.join(", "),
            "a newer release migrated this database; this one runs on it (during a rolling update or a rollback)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read which migrations the database has"),
    }
    let nats = match connect::nats(&servers.nats_url).await {
        Ok(nats) => nats,
        // A validator alone serves while NATS is away, start included: its usage events wait in the spool. (Not when
        // NATS answers and refuses the login: that is the settings' to mend, not time's.)
        Err(e @ connect::ConnectError::Unreachable { .. }) if roles.worker.is_none() => {
            tracing::warn!(error = %e, "starting the validator anyway; usage events are spooled until NATS answers");
            connect::nats_in_background(&servers.nats_url).await?
        }
        Err(e) => return Err(e.into()),
    };
    let topology = Topology::new(namespace);

    // Whatever can fail at start comes before any service runs (a service running when it failed would be aborted,
    // not stopped), and before the demo key is made (a start that fails after it would have made one for nothing).
    let metrics_listener = tollgate_shared::metrics::bind(metrics.metrics_listen)?;
    // Listened for from here: a Ctrl-C during the rest of the start (Redis's connect timeout, say) stops the services
    // gracefully as soon as they run.
    let mut signals = Signals::new()?;
    let worker = match roles.worker {
        // Redis holds only the quota counters, which the workers raise once it answers: no reason to wait for it.
        Some(args) => Some((args, connect::redis_in_background(&servers.redis_url, "the quota counters wait").await?)),
        None => None,
    };
    let validator = match roles.validator {
        Some(args) => {
            let listener = listen::bind(args.listen)
                .with_context(|| format!("cannot listen on {} (TOLLGATE_LISTEN)", args.listen))?;
            // Like NATS, Redis may be away when a validator starts: it serves meanwhile.
            let meanwhile = "every rate limit follows its failure policy";
            let redis = connect::redis_in_background(&servers.redis_url, meanwhile).await?;
            if roles.demo {
                print_demo(&pool, listener.local_addr()?).await?;
            }
            Some((args, listener, redis))
        }
        None => None,
    };

    let shutdown = CancellationToken::new();
    // Stopped last, so that the figures of a shutdown (a drain, the last events) can be read, and liveness probes on
    // it pass until the end.
    let services_stopped = CancellationToken::new();
    let metrics = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(serve_metrics(
        metrics_listener,
        services_stopped.clone(),
    )));
    let mut tasks = tokio::task::JoinSet::new();
    if let Some((args, redis)) = worker {
        let quota = tollgate_worker::QuotaCounters::new(redis.clone(), namespace.redis_prefix.clone());
        let watch = tollgate_worker::reconcile::watch_counter_drift(pool.clone(), quota, DRIFT_CHECK, shutdown.clone());
        tasks.spawn(async move {
            watch.await;
            Ok(())
        });
        for task in 0..args.worker_tasks {
            let connections =
                tollgate_worker::Connections { pool: pool.clone(), nats: nats.clone(), redis: redis.clone() };
            let run = tollgate_worker::run(
                args.clone(),
                topology.clone(),
                namespace.redis_prefix.clone(),
                connections,
                shutdown.clone(),
            );
            // Each task's log lines say which one it is.
            tasks.spawn(run.instrument(tracing::info_span!("worker", task)));
        }
    }
    if let Some((args, listener, redis)) = validator {
        let connections = tollgate_validator::Connections { pool: pool.clone(), redis, nats: nats.clone() };
        tasks.spawn(tollgate_validator::run(args, topology, connections, listener, shutdown.clone()));
    }
    let signalled = shutdown.clone();
    let _signals = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        tokio::select! {
            () = signals.next() => {
                tracing::info!(
                    "shutting down: finishing requests, flushing events and batches (a second signal stops at once)"
                );
                signalled.cancel();
            }
            // A service failed: the stop is under way.
            () = signalled.cancelled() => {}
        }
        let since = std::time::Instant::now();
        loop {
            signals.next().await;
            if since.elapsed() >= SAME_SIGNAL {
                break;
            }
        }
        tracing::warn!("second signal: stopping at once; usage events not yet in JetStream or the spool are lost");
        std::process::exit(1);
    }));

    // A service that fails stops the others as a signal would, so that they finish what they hold.
    let mut failure = None;
    while let Some(finished) = tasks.join_next().await {
        if let Err(e) = finished.context("a service panicked").and_then(|result| result) {
            if failure.is_none() {
                tracing::error!("a service failed; stopping the others");
                shutdown.cancel();
                failure = Some(e);
            } else {
                tracing::error!(error = format!("{e:#}"), "another service failed while stopping");
            }
        }
    }
    services_stopped.cancel();
    let metrics = metrics.await.context("the metrics endpoint panicked").and_then(|served| served);
    failure.map_or(metrics, Err)
}

/// Every connection is an open file: takes the hard limit as the soft one, as Go's runtime does, so that a soft limit of
/// 1024 (systemd's default) does not cap the connections a validator can hold from its gateways.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        if let Err(e) = setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, ..limit }) {
            tracing::warn!(error = %e, soft = ?limit.current, "cannot raise the open-files limit: raise it with ulimit -n");
        }
    }
}

async fn serve_metrics(listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "metrics at /metrics");
    tollgate_shared::metrics::serve(listener, shutdown.cancelled_owned()).await;
    Ok(())
}

/// How soon after the first signal another is taken as the same one (a terminal and a wrapper script may both pass
/// on one Ctrl-C), not as the second that stops at once.
const SAME_SIGNAL: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGINT (Ctrl-C) and SIGTERM, listened for from when this is made, so that none arriving between two waits is lost.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn new() -> anyhow::Result<Signals> {
        let listen = |kind| tokio::signal::unix::signal(kind).context("cannot listen for SIGINT and SIGTERM");
        Ok(Signals { interrupt: listen(SignalKind::interrupt())?, terminate: listen(SignalKind::terminate())? })
    }

    /// Until the next SIGINT or SIGTERM.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

const DEMO_SLUG: &str = "demo";

/// How long a demo key works: every start makes one (and prints it), so none should outlive a day of trying.
const DEMO_KEY_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// Creates (once) a demo organization with a generous limit, makes a fresh key that works for a day, and prints a
/// curl line for it.
async fn print_demo(pool: &sqlx::PgPool, address: std::net::SocketAddr) -> anyhow::Result<()> {
    if admin::find_org(pool, DEMO_SLUG).await.is_err() {
        let demo = NewOrg {
            name: "Demo".into(),
            slug: Some(DEMO_SLUG.into()),
            plan: PlanName::from_static(PlanName::DEFAULT),
            rate_limit_per_minute: Some(LimitSetting::Max(1_000_000)),
            monthly_request_limit: None,
            max_api_keys: Some(100_000),
        };
        admin::create_org(pool, demo).await?;
    }
    let new = NewKey {
        org: DEMO_SLUG.into(),
        name: "demo key".into(),
        role: Role::User,
        tier: TierName::from_static("unlimited"),
        scopes: vec![],
        custom_rate_limit_per_minute: None,
        expires_at: Some(chrono::Utc::now() + DEMO_KEY_LIFETIME),
    };
    let (_, key) = admin::create_key(pool, &Actor::cli(), new, KeyEnv::Test).await?;
    println!("Demo key (organization `{DEMO_SLUG}`, works for a day), shown once:\n\n  {}\n", key.expose());
    println!(
        "Try it:\n\n  curl -i -H 'Authorization: Bearer {}' http://{}/v1/auth\n",
        key.expose(),
        reachable(address)
    );
    Ok(())
}

/// Where a client on this machine reaches a listener: a wildcard address (0.0.0.0, ::) is no destination.
fn reachable(mut address: std::net::SocketAddr) -> std::net::SocketAddr {
    match address.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => address.set_ip(std::net::Ipv4Addr::LOCALHOST.into()),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => address.set_ip(std::net::Ipv6Addr::LOCALHOST.into()),
        _ => {}
    }
    address
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_wildcard_listener_is_reached_on_loopback() {
        for (listening, reached) in
            [("0.0.0.0:8080", "127.0.0.1:8080"), ("[::]:8080", "[::1]:8080"), ("192.0.2.7:8080", "192.0.2.7:8080")]
        {
            assert_eq!(super::reachable(listening.parse().expect("an address")).to_string(), reached);
        }
    }
}
