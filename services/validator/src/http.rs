//! The HTTP API: `/v1/auth` for gateways, `/v1/verify` for services, and the health probes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use tollgate_shared::codec::{MAX_METHOD_LEN, MAX_TEXT_LEN};
use tollgate_shared::domain::{Outcome, Role};
use tollgate_shared::event::UsageEvent;
use tollgate_shared::metrics::{VERIFY_DURATION, VERIFY_REQUESTS};

use crate::decision::decide;
use crate::keys::{KeyCache, KeyRecord};
use crate::publisher::EventQueue;
use crate::request::{self, Credential, TrustedProxies};

/// Largest `/v1/verify` body; a request is a key and a few short fields.
const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_COST: u32 = 1000;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct AppState {
    pub keys: KeyCache,
    pub events: EventQueue,
    pub proxies: TrustedProxies,
    pub pool: sqlx::PgPool,
    pub redis: redis::aio::ConnectionManager,
    pub nats: async_nats::Client,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/auth", any(auth))
        .route("/v1/verify", post(verify))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// One verify request, whichever endpoint it came through.
struct Attempt {
    started: Instant,
    credential: Credential,
    method: String,
    path: String,
    client_ip: IpAddr,
    user_agent: Option<String>,
    request_id: Option<String>,
    cost: u32,
}

enum Verdict {
    /// No key we know: missing, malformed or unknown. Recorded in metrics only.
    Unidentified(&'static str),
    Decided {
        outcome: Outcome,
        record: Arc<KeyRecord>,
        event_id: Uuid,
    },
    /// The key is not cached and PostgreSQL did not answer.
    Unavailable,
}

impl AppState {
    async fn decide(&self, attempt: Attempt) -> Verdict {
        let key = match attempt.credential {
            Credential::Missing => return self.finish(attempt.started, Verdict::Unidentified("missing")),
            Credential::Malformed(_) => return self.finish(attempt.started, Verdict::Unidentified("malformed")),
            Credential::Key(key) => key,
        };
        let record = match self.keys.lookup(key.hash()).await {
            Ok(Some(record)) => record,
            Ok(None) => return self.finish(attempt.started, Verdict::Unidentified("unknown")),
            Err(e) => {
                tracing::error!(error = %e, "cannot look up a key that is not cached");
                return self.finish(attempt.started, Verdict::Unavailable);
            }
        };
        let now = Utc::now();
        let outcome = decide(&record, now);
        let event_id = Uuid::now_v7();
        let latency_us = u32::try_from(attempt.started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let queued = self
            .events
            .push(UsageEvent {
                event_id,
                ts: now,
                org_id: record.org_id,
                key_id: record.id,
                outcome,
                method: attempt.method,
                path: attempt.path,
                client_ip: Some(attempt.client_ip),
                user_agent: attempt.user_agent,
                request_id: attempt.request_id,
                units: attempt.cost,
                latency_us,
            })
            .await;
        // The spool is full (policy `block`): an event that cannot be recorded must not be a decision either.
        if queued.is_err() {
            return self.finish(attempt.started, Verdict::Unavailable);
        }
        self.finish(attempt.started, Verdict::Decided { outcome, record, event_id })
    }

    fn finish(&self, started: Instant, verdict: Verdict) -> Verdict {
        let label: &'static str = match &verdict {
            Verdict::Unidentified(reason) => reason,
            Verdict::Decided { outcome, .. } => outcome.as_str(),
            Verdict::Unavailable => "unavailable",
        };
        metrics::counter!(VERIFY_REQUESTS, "outcome" => label).increment(1);
        metrics::histogram!(VERIFY_DURATION).record(started.elapsed().as_secs_f64());
        verdict
    }
}

/// Forward auth for gateways: 200 with the key's identity in headers, or 401 with one uniform body.
async fn auth(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let attempt = Attempt {
        started: Instant::now(),
        credential: request::credential(&headers),
        method: request::original_method(&headers).unwrap_or_else(|| method.as_str().to_owned()),
        path: request::original_uri(&headers).unwrap_or_else(|| request::truncate(uri.path(), MAX_TEXT_LEN)),
        client_ip: state.proxies.client_ip(peer.ip(), &headers, None),
        user_agent: request::user_agent(&headers),
        request_id: request::request_id(&headers),
        cost: 1,
    };
    match state.decide(attempt).await {
        Verdict::Decided { outcome: Outcome::Allowed, record, event_id } => {
            let mut response = StatusCode::OK.into_response();
            let out = response.headers_mut();
            out.insert(HeaderName::from_static("x-tollgate-key-id"), uuid_header(record.id));
            out.insert(HeaderName::from_static("x-tollgate-org-id"), uuid_header(record.org_id));
            out.insert(HeaderName::from_static("x-tollgate-role"), HeaderValue::from_static(record.role.as_str()));
            out.insert(HeaderName::from_static("x-tollgate-event-id"), uuid_header(event_id));
            // A name that cannot be a header value (control characters) is left out rather than failing the request.
            if let Ok(name) = HeaderValue::from_bytes(record.name.as_bytes()) {
                out.insert(HeaderName::from_static("x-tollgate-key-name"), name);
            }
            response
        }
        Verdict::Decided { .. } | Verdict::Unidentified(_) => unauthorized(),
        Verdict::Unavailable => unavailable(),
    }
}

fn uuid_header(id: Uuid) -> HeaderValue {
    HeaderValue::from_str(&id.to_string()).expect("a UUID is a valid header value")
}

/// The same answer for every kind of bad key: the reason goes to the event and to metrics, not to the caller.
fn unauthorized() -> Response {
    let body = Json(json!({ "error": "unauthorized", "message": "a valid API key is required" }));
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer realm=\"tollgate\"")], body).into_response()
}

fn unavailable() -> Response {
    let body = Json(json!({ "error": "unavailable", "message": "key store unavailable; retry shortly" }));
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
}

#[derive(Deserialize)]
struct VerifyBody {
    key: String,
    #[serde(default = "one")]
    cost: u32,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    ip: Option<IpAddr>,
    #[serde(default)]
    request_id: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Serialize)]
struct VerifyAnswer {
    valid: bool,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<Uuid>,
}

/// JSON verification for services that call Tollgate directly.
async fn verify(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let body: VerifyBody = match serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body)) {
        Ok(body) => body,
        Err(e) => return bad_request(&e.path().to_string(), &e.inner().to_string()),
    };
    if body.cost == 0 || body.cost > MAX_COST {
        return bad_request("cost", &format!("must be between 1 and {MAX_COST}"));
    }
    let attempt = Attempt {
        started,
        credential: Credential::from_text(&body.key),
        method: request::truncate(&body.method.unwrap_or_default(), MAX_METHOD_LEN),
        path: request::truncate(&body.path.unwrap_or_default(), MAX_TEXT_LEN),
        client_ip: state.proxies.client_ip(peer.ip(), &headers, body.ip),
        user_agent: request::user_agent(&headers),
        request_id: body.request_id.map(|id| request::truncate(&id, MAX_TEXT_LEN)),
        cost: body.cost,
    };
    let answer = match state.decide(attempt).await {
        Verdict::Decided { outcome, record, event_id } => VerifyAnswer {
            valid: outcome.is_allowed(),
            code: outcome.code(),
            key_id: Some(record.id),
            org_id: Some(record.org_id),
            name: Some(record.name.clone()),
            role: Some(record.role),
            scopes: Some(record.scopes.clone()),
            expires_at: record.expires_at,
            event_id: Some(event_id),
        },
        Verdict::Unidentified(_) => VerifyAnswer {
            valid: false,
            code: "INVALID",
            key_id: None,
            org_id: None,
            name: None,
            role: None,
            scopes: None,
            expires_at: None,
            event_id: None,
        },
        Verdict::Unavailable => return unavailable(),
    };
    Json(answer).into_response()
}

fn bad_request(field: &str, message: &str) -> Response {
    let field = (field != ".").then_some(field);
    let body = json!({ "error": "invalid_request", "field": field, "message": message });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// 200 only when PostgreSQL, Redis and NATS all answer; otherwise 503 with each one's status.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let postgres = async { sqlx::query("SELECT 1").execute(&state.pool).await.is_ok() };
    let redis = async {
        let mut redis = state.redis.clone();
        redis::cmd("PING").query_async::<String>(&mut redis).await.is_ok()
    };
    let nats = async { state.nats.flush().await.is_ok() };
    let within = |ok: Option<bool>| if ok == Some(true) { "ok" } else { "unavailable" };
    let (postgres, redis, nats) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, postgres),
        tokio::time::timeout(PROBE_TIMEOUT, redis),
        tokio::time::timeout(PROBE_TIMEOUT, nats),
    );
    let status = json!({
        "postgres": within(postgres.ok()),
        "redis": within(redis.ok()),
        "nats": within(nats.ok()),
    });
    let ready = status.as_object().is_some_and(|s| s.values().all(|v| v == "ok"));
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(status)).into_response()
}
