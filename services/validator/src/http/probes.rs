//! `/healthz`, for load balancers, and `/readyz`: whether the servers answer, for alerts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::limiter::Health;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// 200 while the validator takes requests; 503 once it is shutting down (see `TOLLGATE_SHUTDOWN_DELAY`).
pub async fn healthz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ok")
    }
}

/// 200 when PostgreSQL, Redis and NATS all answer, and JetStream has the usage stream; otherwise 503. The body gives
/// each one's status, and `ratelimit` how the limiter decides (`degraded`: by the failure policies). The validator
/// keeps answering meanwhile (usage events go to the spool while the stream cannot take them, which a stream never
/// made, by a setting to mend, would fill), so this is for alerts; load balancers check `/healthz`, since every
/// replica shares the same servers.
///
/// Calls at once share probes: one that comes while a probe is under way gets its answer, so that a flood of them
/// (anyone who reaches the port may call it) sends no more queries to the servers than one caller would, and none
/// waits for more than one probe.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let came = Instant::now();
    let mut last = state.readiness.lock().await;
    let answer = match &*last {
        Some(answer) if answer.probed_until >= came => answer.clone(),
        _ => {
            let answer = probe(&state).await;
            *last = Some(answer.clone());
            answer
        }
    };
    (answer.code, Json(answer.status)).into_response()
}

/// What `/readyz` answered last: it probes one call at a time.
pub type Readiness = tokio::sync::Mutex<Option<ReadyAnswer>>;

#[derive(Clone)]
pub struct ReadyAnswer {
    /// When its probe ended.
    probed_until: Instant,
    code: StatusCode,
    status: serde_json::Value,
}

async fn probe(state: &AppState) -> ReadyAnswer {
    let postgres = async { sqlx::query("SELECT 1").execute(&state.pool).await.is_ok() };
    let redis = async {
        let Some(mut redis) = state.redis.get() else { return false };
        redis::cmd("PING").query_async::<String>(&mut redis).await.is_ok()
    };
    let nats = async { state.nats.flush().await.is_ok() };
    let jetstream =
        async { async_nats::jetstream::new(state.nats.clone()).get_stream(&state.usage_stream).await.is_ok() };
    let within = |ok: Option<bool>| if ok == Some(true) { "ok" } else { "unavailable" };
    let (postgres, redis, nats, jetstream) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, postgres),
        tokio::time::timeout(PROBE_TIMEOUT, redis),
        tokio::time::timeout(PROBE_TIMEOUT, nats),
        tokio::time::timeout(PROBE_TIMEOUT, jetstream),
    );
    let redis_ok = redis.as_ref().ok() == Some(&true);
    let limiter = match (state.limiter.health(), redis_ok) {
        (Health::Ok, true) => "ok",
        _ => "degraded",
    };
    let status = json!({
        "postgres": within(postgres.ok()),
        "redis": within(redis.ok()),
        "nats": within(nats.ok()),
        "usage_stream": within(jetstream.ok()),
        "ratelimit": limiter,
    });
    let ready = ["postgres", "redis", "nats", "usage_stream"].iter().all(|server| status[*server] == "ok");
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    ReadyAnswer { probed_until: Instant::now(), code, status }
}
