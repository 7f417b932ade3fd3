//! The validator: answers "is this key good?" over HTTP from an in-process cache, and publishes every decision on
//! an identified key to JetStream without making the caller wait for it.

mod decision;
mod http;
mod keys;
mod limiter;
mod publisher;
mod request;
mod window;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tollgate_shared::config::ValidatorArgs;
use tollgate_shared::topology::Topology;

pub use keys::{KeyCache, KeyRecord};
pub use limiter::quota_key;

/// The servers the validator talks to.
pub struct Connections {
    pub pool: sqlx::PgPool,
    pub redis: redis::aio::ConnectionManager,
    pub nats: async_nats::Client,
}

/// Serves the HTTP API on `listener` until `shutdown` is cancelled; then stops accepting, finishes in-flight
/// requests, and returns once every queued event is acknowledged by JetStream.
pub async fn run(
    args: ValidatorArgs,
    topology: Topology,
    connections: Connections,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let jetstream = async_nats::jetstream::new(connections.nats.clone());
    topology.ensure_usage_stream(&jetstream).await?;
    let (events, publisher) = publisher::channel(args.event_queue, jetstream, topology.usage_subject());
    let publishing = tokio::spawn(publisher.run());

    let keys = KeyCache::new(connections.pool.clone(), args.key_cache, args.negative_cache_ttl);
    let refreshing = tokio::spawn(keys.clone().keep_fresh(args.key_refresh, shutdown.clone()));

    let state = Arc::new(http::AppState {
        keys,
        events,
        proxies: request::TrustedProxies::new(args.trusted_proxies),
        pool: connections.pool,
        limiter: limiter::Limiter::new(connections.redis.clone(), &args.limits),
        redis: connections.redis,
        nats: connections.nats,
        redis_prefix: topology.redis_prefix.clone(),
        ip_failures_per_minute: args.limits.ip_failures_per_minute,
    });
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    tracing::info!(address = %listener.local_addr()?, "validator listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned()).await?;

    // The router, and with it every handle on the event queue, is gone: the publisher drains and stops.
    publishing.await.context("the event publisher panicked")?;
    refreshing.await.context("the key refresher panicked")?;
    tracing::info!("validator stopped; every event is in JetStream");
    Ok(())
}
