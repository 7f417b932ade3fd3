//! The validator: answers "is this key good?" over HTTP from an in-process cache, and publishes every decision on
//! an identified key to JetStream without making the caller wait for it.

mod decision;
mod http;
mod keys;
mod limiter;
mod publisher;
mod request;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tollgate_shared::config::ValidatorArgs;
use tollgate_shared::listen;
use tollgate_shared::metrics::HTTP_CONNECTIONS;
use tollgate_shared::topology::Topology;

use publisher::spool::{Spool, SpoolOptions};

pub use keys::{KeyCache, KeyRecord};
pub use limiter::quota_key;

/// The servers the validator talks to.
pub struct Connections {
    pub pool: sqlx::PgPool,
    pub redis: tollgate_shared::connect::BackgroundRedis,
    pub nats: async_nats::Client,
}

/// Serves the HTTP API on `listener` until `shutdown` is cancelled; then drains (`/healthz` answers 503, requests are
/// still served for `shutdown_delay`), stops accepting, gives requests in flight up to `shutdown_grace`, and returns
/// once every queued event is acknowledged by JetStream or, if NATS is away, in the spool.
pub async fn run(
    args: ValidatorArgs,
    topology: Topology,
    connections: Connections,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything registers a metric or takes a handle on one: either would count nowhere.
    tollgate_shared::metrics::install();
    // Then, so that a second validator on the same spool directory stops before it touches anything else.
    let spool = open_spool(&args).await?;
    let keys = KeyCache::new(connections.pool.clone(), args.key_cache, args.negative_cache_ttl, args.key_recheck)
        .await
        .context("the key cache cannot ask PostgreSQL where to watch for key changes from")?;
    // What serving needs goes on until serving is over, not only until the signal: revocations must still reach the
    // cache while it drains.
    let serving = CancellationToken::new();
    let _stop_when_served = serving.clone().drop_guard();
    let jetstream = async_nats::jetstream::new(connections.nats.clone());
    let stream = if connections.nats.connection_state() == async_nats::connection::State::Connected {
        topology.ensure_usage_stream(&jetstream).await.map(drop).map_err(|e| e.to_string())
    } else {
        Err("NATS does not answer".to_owned())
    };
    // Either way it serves: a NATS without JetStream (a cluster between JetStream leaders) is one away for usage.
    if let Err(e) = stream {
        tracing::warn!(error = %e, "no usage stream yet: serving anyway, usage events go to the spool until it is made");
        tokio::spawn(create_stream_when_nats_answers(topology.clone(), jetstream.clone(), serving.clone()));
    }
    let settings = publisher::Settings {
        publish_timeout: args.publish_timeout,
        full_policy: args.spool_full,
        fsync: args.spool_fsync,
    };
    let (events, publisher) =
        publisher::channel(args.event_queue, connections.nats.clone(), topology.usage_subject(), spool, settings);
    let publishing = tokio::spawn(publisher.run());

    let refreshing = tokio::spawn(keys.clone().keep_fresh(args.key_refresh, serving.clone()));

    let state = Arc::new(http::AppState {
        keys,
        events,
        proxies: request::TrustedProxies::new(args.trusted_proxies.0),
        pool: connections.pool,
        limiter: limiter::Limiter::new(connections.redis.clone(), &args.limits, &topology.redis_prefix),
        redis: connections.redis,
        nats: connections.nats,
        redis_prefix: topology.redis_prefix.clone(),
        usage_stream: topology.stream.clone(),
        ip_failures_per_minute: args.limits.ip_failures_per_minute,
        blocked_ips: http::BlockedIps::new(),
        read_timeout: args.connections.read_timeout,
        metrics: http::RequestMetrics::new(),
        lookup_failures: http::LogThrottle::default(),
        draining: AtomicBool::new(false),
        readiness: http::Readiness::default(),
    });
    tracing::info!(address = %listener.local_addr()?, "validator listening");
    let open = metrics::gauge!(HTTP_CONNECTIONS, "listener" => "api");
    let stop_accepting = drain(state.clone(), args.shutdown_delay, shutdown.clone());
    listen::serve(listener, http::router(state), args.connections, open, stop_accepting).await;
    serving.cancel();

    // The router, and with it every handle on the event queue, is gone: the publisher drains and stops.
    publishing.await.context("the event publisher panicked")?;
    refreshing.await.context("the key refresher panicked")?;
    tracing::info!("validator stopped; every event is in JetStream or in the spool");
    Ok(())
}

/// Once `shutdown` is cancelled: turns `/healthz` to 503 and keeps serving for `delay`, so that load balancers stop
/// sending requests before connections are refused.
async fn drain(state: Arc<http::AppState>, delay: Duration, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    state.draining.store(true, Ordering::Relaxed);
    if !delay.is_zero() {
        tracing::info!(?delay, "draining: /healthz answers 503; still serving until the delay is over");
        tokio::time::sleep(delay).await;
    }
}

/// Creates the usage stream once NATS and its JetStream answer (the spool's replay succeeds only then), unless
/// `serving` ends first.
async fn create_stream_when_nats_answers(
    topology: Topology,
    jetstream: async_nats::jetstream::Context,
    serving: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1.. {
        if serving.is_cancelled() {
            return;
        }
        match topology.ensure_usage_stream(&jetstream).await {
            Ok(_) => {
                tracing::info!(stream = %topology.stream, "NATS answers; usage stream ready");
                return;
            }
            // Said again now and then (every minute or so once the wait is 2 s): what keeps it from being made may
            // be a setting to mend (a stream of another name taking these subjects), not only time.
            Err(e) if attempt % 30 == 0 => tracing::warn!(error = %e, "still no usage stream; events are spooled"),
            Err(e) => tracing::debug!(error = %e, "usage stream not ready yet"),
        }
        tokio::select! {
            _ = serving.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Opens and locks the spool directory before serving, so a second validator on the same directory fails at start.
async fn open_spool(args: &ValidatorArgs) -> anyhow::Result<Spool> {
    let dir = args.spool_dir.clone();
    let options = SpoolOptions::new(args.spool_max_bytes, args.spool_fsync);
    let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, options))
        .await
        .context("opening the spool panicked")??;
    tracing::info!(dir = %args.spool_dir.display(), bytes = spool.bytes(), "usage event spool open");
    Ok(spool)
}
