//! The HTTP API: `/v1/auth` for gateways, `/v1/verify` for services, and the health probes.
//!
//! Both endpoints share one decision path ([`AppState::decide`]): the key's own state, then what the route requires
//! (scopes, role), then every rate limit and the quota in one limiter call; bad-key answers are limited per client
//! IP.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use tollgate_shared::codec::{MAX_METHOD_LEN, MAX_TEXT_LEN};
use tollgate_shared::domain::{Outcome, Role};
use tollgate_shared::event::UsageEvent;
use tollgate_shared::metrics::{start_at_zero, LabeledCounter, IP_FAILURES_LIMITED, VERIFY_DURATION, VERIFY_REQUESTS};

use crate::decision::{decide, Requirement};
use crate::keys::{KeyCache, KeyRecord, LookupError};
use crate::limiter::{Decision, Health, LimitKind, Limiter, Plan, Usage};
use crate::publisher::EventQueue;
use crate::request::{self, Credential, TrustedProxies};

/// Largest `/v1/verify` body; a request is a key and a few short fields.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest cost of one request: bounded so one request cannot drain a limit an operator sized for many.
const MAX_COST: u32 = 1000;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Names of the headers read from every request or written to every answer, parsed at compile time rather than per
/// request.
const X_TOLLGATE_COST: HeaderName = HeaderName::from_static("x-tollgate-cost");
const X_TOLLGATE_REQUIRE_SCOPE: HeaderName = HeaderName::from_static("x-tollgate-require-scope");
const X_TOLLGATE_REQUIRE_ROLE: HeaderName = HeaderName::from_static("x-tollgate-require-role");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_USED: HeaderName = HeaderName::from_static("x-ratelimit-used");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_TOLLGATE_KEY_ID: HeaderName = HeaderName::from_static("x-tollgate-key-id");
const X_TOLLGATE_ORG_ID: HeaderName = HeaderName::from_static("x-tollgate-org-id");
const X_TOLLGATE_ROLE: HeaderName = HeaderName::from_static("x-tollgate-role");
const X_TOLLGATE_EVENT_ID: HeaderName = HeaderName::from_static("x-tollgate-event-id");
const X_TOLLGATE_KEY_NAME: HeaderName = HeaderName::from_static("x-tollgate-key-name");

pub struct AppState {
    pub keys: KeyCache,
    pub events: EventQueue,
    pub proxies: TrustedProxies,
    pub pool: sqlx::PgPool,
    pub redis: tollgate_shared::connect::BackgroundRedis,
    pub nats: async_nats::Client,
    pub limiter: Limiter,
    pub redis_prefix: String,
    /// 401s per client IP per minute before 429; 0 = no limit.
    pub ip_failures_per_minute: u32,
    pub metrics: RequestMetrics,
}

/// Handles of the metrics every request updates, taken once (see [`LabeledCounter`]).
pub struct RequestMetrics {
    requests: LabeledCounter<1>,
    duration: metrics::Histogram,
}

impl RequestMetrics {
    pub fn new() -> RequestMetrics {
        let outcomes = Outcome::ALL.iter().map(|o| o.as_str()).chain(Verdict::UNDECIDED_LABELS);
        start_at_zero(&[IP_FAILURES_LIMITED]);
        RequestMetrics {
            requests: LabeledCounter::new(VERIFY_REQUESTS, ["outcome"], outcomes.map(|o| [o])),
            duration: metrics::histogram!(VERIFY_DURATION),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/auth", any(auth))
        // Envoy's HTTP ext_authz appends the original path to its path prefix.
        .route("/v1/auth/{*original_path}", any(auth))
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
    requirement: Requirement,
}

enum Verdict {
    /// No key we know: missing, malformed or unknown. Recorded in metrics only.
    Unidentified(&'static str),
    Decided {
        outcome: Outcome,
        record: Arc<KeyRecord>,
        event_id: Uuid,
        /// The most restrictive limit (allowed) or the one that denied; `None` when no limit applies or the key
        /// was refused before limits were looked at.
        usage: Option<Usage>,
    },
    /// The client IP sent too many bad keys: 429 instead of 401.
    IpLimited(Usage),
    /// The key is not cached and PostgreSQL did not answer.
    Unavailable,
    /// Redis cannot decide and the limit's failure policy is `closed`.
    LimiterUnavailable,
}

impl Verdict {
    /// The metric labels of verdicts that are not a key's outcome (see [`Verdict::label`]).
    const UNDECIDED_LABELS: [&'static str; 6] =
        ["missing", "malformed", "unknown", "ip_limited", "unavailable", "limiter_unavailable"];

    /// The `outcome` label of `tollgate_verify_requests_total`.
    fn label(&self) -> &'static str {
        match self {
            Verdict::Unidentified(reason) => reason,
            Verdict::Decided { outcome, .. } => outcome.as_str(),
            Verdict::IpLimited(_) => "ip_limited",
            Verdict::Unavailable => "unavailable",
            Verdict::LimiterUnavailable => "limiter_unavailable",
        }
    }

    /// Whether the caller is told their key is bad (401): what the per-IP limiter counts.
    fn is_unauthorized(&self) -> bool {
        match self {
            Verdict::Unidentified(_) => true,
            Verdict::Decided { outcome, .. } => {
                matches!(outcome, Outcome::Revoked | Outcome::Expired | Outcome::Disabled)
            }
            _ => false,
        }
    }
}

impl AppState {
    async fn decide(&self, attempt: Attempt) -> Verdict {
        let client_ip = attempt.client_ip;
        let started = attempt.started;
        let verdict = self.decide_key(attempt).await;
        let verdict = if verdict.is_unauthorized() { self.count_failure(client_ip, verdict).await } else { verdict };
        self.finish(started, verdict)
    }

    /// Counts a bad-key answer against the client IP; past the limit the answer becomes 429. A valid key is never
    /// counted, so it is never blocked by this.
    async fn count_failure(&self, ip: IpAddr, verdict: Verdict) -> Verdict {
        if self.ip_failures_per_minute == 0 {
            return verdict;
        }
        let plan = Plan::for_ip_failures(ip, self.ip_failures_per_minute);
        match self.limiter.decide(plan, 1).await {
            Decision::Denied { usage, .. } => {
                metrics::counter!(IP_FAILURES_LIMITED).increment(1);
                Verdict::IpLimited(usage)
            }
            Decision::Allowed { .. } | Decision::Unavailable => verdict,
        }
    }

    async fn decide_key(&self, attempt: Attempt) -> Verdict {
        let key = match attempt.credential {
            Credential::Missing => return Verdict::Unidentified("missing"),
            Credential::Malformed(_) => return Verdict::Unidentified("malformed"),
            Credential::Key(key) => key,
        };
        let record = match self.keys.lookup(key.hash()).await {
            Ok(Some(record)) => record,
            Ok(None) => return Verdict::Unidentified("unknown"),
            // The refresher logs this once per attempt, not once per request.
            Err(LookupError::DatabaseAway) => return Verdict::Unavailable,
            Err(e) => {
                tracing::error!(error = %e, "cannot look up a key that is not cached");
                return Verdict::Unavailable;
            }
        };
        let mut now = Utc::now();
        let mut outcome = decide(&record, now);
        if outcome == Outcome::Allowed && !attempt.requirement.is_met_by(&record) {
            outcome = Outcome::InsufficientScope;
        }
        let mut usage = None;
        let mut shadow_outcome = None;
        if outcome == Outcome::Allowed {
            let plan = Plan::for_key(&record, &self.redis_prefix, now);
            match self.limiter.decide(plan, attempt.cost).await {
                Decision::Allowed { usage: u, shadow, now_us } => {
                    usage = u;
                    shadow_outcome = shadow.map(denial_outcome);
                    // The limiter's clock (Redis's, shared by every validator) stamps the event when it decided.
                    now = DateTime::from_timestamp_micros(now_us).unwrap_or(now);
                }
                Decision::Denied { usage: u, now_us } => {
                    outcome = denial_outcome(u.kind);
                    usage = Some(u);
                    now = DateTime::from_timestamp_micros(now_us).unwrap_or(now);
                }
                Decision::Unavailable => return Verdict::LimiterUnavailable,
            }
        }
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
                shadow_outcome,
            })
            .await;
        // The spool is full (policy `block`): an event that cannot be recorded must not be a decision either.
        if queued.is_err() {
            return Verdict::Unavailable;
        }
        Verdict::Decided { outcome, record, event_id, usage }
    }

    fn finish(&self, started: Instant, verdict: Verdict) -> Verdict {
        self.metrics.requests.increment([verdict.label()]);
        self.metrics.duration.record(started.elapsed().as_secs_f64());
        verdict
    }
}

/// The outcome of a request a limit denies.
fn denial_outcome(kind: LimitKind) -> Outcome {
    if kind == LimitKind::Quota {
        Outcome::QuotaExceeded
    } else {
        Outcome::RateLimited
    }
}

/// Why a request's parameters were refused: the field and the message for the 400 body.
type BadParameter = (&'static str, String);

/// The cost in `X-Tollgate-Cost` (default 1). Of several values (the header repeated, or values joined with commas
/// by a proxy) the largest counts: a gateway that appends its route's cost to a client's own header, as Envoy's
/// `request_headers_to_add` does by default, must not be undercut by the client.
fn cost_header(headers: &HeaderMap) -> Result<u32, BadParameter> {
    let mut cost = None;
    for value in headers.get_all(X_TOLLGATE_COST) {
        for text in value.to_str().unwrap_or("").split(',') {
            let one = text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|c| (1..=MAX_COST).contains(c))
                .ok_or_else(|| ("X-Tollgate-Cost", format!("must be a number between 1 and {MAX_COST}")))?;
            cost = cost.max(Some(one));
        }
    }
    Ok(cost.unwrap_or(1))
}

/// Scopes and role a route requires, from the query (`scope=a,b&role=admin`) and from
/// `X-Tollgate-Require-Scope` / `X-Tollgate-Require-Role`; all of them apply.
fn requirement(query: Option<&str>, headers: &HeaderMap) -> Result<Requirement, BadParameter> {
    let mut scopes: Vec<String> = Vec::new();
    let mut roles: Vec<String> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            "scope" => scopes.push(value.into_owned()),
            "role" => roles.push(value.into_owned()),
            _ => {}
        }
    }
    for value in headers.get_all(X_TOLLGATE_REQUIRE_SCOPE) {
        scopes.push(value.to_str().map_err(|_| ("X-Tollgate-Require-Scope", "not text".to_owned()))?.to_owned());
    }
    for value in headers.get_all(X_TOLLGATE_REQUIRE_ROLE) {
        roles.push(value.to_str().map_err(|_| ("X-Tollgate-Require-Role", "not text".to_owned()))?.to_owned());
    }
    requirement_from(&scopes, &roles)
}

fn requirement_from(scopes: &[String], roles: &[String]) -> Result<Requirement, BadParameter> {
    let scopes = scopes
        .iter()
        .flat_map(|s| s.split([',', ' ']))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let roles = roles
        .iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .map(|r| r.parse::<Role>().map_err(|_| ("role", "must be admin, user or guest".to_owned())))
        .collect::<Result<Vec<Role>, _>>()?;
    // Several required roles: the highest applies.
    let role = roles.into_iter().max_by_key(|r| Requirement::rank(*r));
    Ok(Requirement { scopes, role })
}

/// Rounds microseconds since the epoch up to whole seconds.
fn epoch_seconds(us: i64) -> i64 {
    us.div_euclid(1_000_000) + i64::from(us.rem_euclid(1_000_000) > 0)
}

/// Whole seconds from the decision until `usage` resets, rounded up.
fn seconds_until(usage: &Usage) -> i64 {
    epoch_seconds(usage.reset_at_us - usage.now_us).max(0)
}

/// Header values formatted into one buffer and handed out as slices of it: one allocation for an answer's values,
/// where `HeaderValue::from` makes one per value (the hot path's answer carries ten).
struct HeaderValues(BytesMut);

impl HeaderValues {
    fn new() -> HeaderValues {
        // Enough for the limit headers, three ids and a key name; a longer name only makes the buffer grow.
        HeaderValues(BytesMut::with_capacity(320))
    }

    /// Inserts `name: value`, or leaves it out if the text cannot be a header value.
    fn insert(&mut self, out: &mut HeaderMap, name: HeaderName, value: std::fmt::Arguments) {
        // Writing into a `BytesMut` cannot fail: it grows.
        let _ = self.0.write_fmt(value);
        if let Ok(value) = HeaderValue::from_maybe_shared(self.0.split().freeze()) {
            out.insert(name, value);
        }
    }
}

/// `X-RateLimit-*` and the IETF `RateLimit-Policy` / `RateLimit` fields for the most restrictive limit.
fn limit_headers(out: &mut HeaderMap, values: &mut HeaderValues, usage: &Usage) {
    let kind = usage.kind.as_str();
    values.insert(out, X_RATELIMIT_LIMIT, format_args!("{}", usage.limit));
    values.insert(out, X_RATELIMIT_REMAINING, format_args!("{}", usage.remaining()));
    values.insert(out, X_RATELIMIT_USED, format_args!("{}", usage.used));
    values.insert(out, X_RATELIMIT_RESET, format_args!("{}", epoch_seconds(usage.reset_at_us)));
    values.insert(out, RATELIMIT_POLICY, format_args!("\"{kind}\";q={};w={}", usage.limit, usage.window_seconds));
    values.insert(out, RATELIMIT, format_args!("\"{kind}\";r={};t={}", usage.remaining(), seconds_until(usage)));
}

/// 429 for a denied request: `Retry-After`, the limit headers and `{"error", "limit", "reset_at"}`.
fn too_many(error: &'static str, usage: &Usage) -> Response {
    let retry_after = seconds_until(usage).max(1);
    let body = Json(json!({
        "error": error,
        "limit": usage.limit,
        "used": usage.used,
        "window_seconds": usage.window_seconds,
        "reset_at": reset_at(usage),
        "retry_after": retry_after,
    }));
    let mut response = (StatusCode::TOO_MANY_REQUESTS, body).into_response();
    limit_headers(response.headers_mut(), &mut HeaderValues::new(), usage);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

fn reset_at(usage: &Usage) -> String {
    DateTime::<Utc>::from_timestamp(epoch_seconds(usage.reset_at_us), 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn forbidden() -> Response {
    let body =
        Json(json!({ "error": "insufficient_scope", "message": "the key lacks a scope or role this route requires" }));
    (StatusCode::FORBIDDEN, body).into_response()
}

fn limiter_unavailable() -> Response {
    let body = Json(json!({ "error": "unavailable", "message": "rate limiter unavailable; retry shortly" }));
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
}

/// Forward auth for gateways: 200 with the key's identity in headers, or 401 with one uniform body.
async fn auth(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    // Taken apart rather than extracted piece by piece: the `HeaderMap` extractor would copy every header.
    let (Parts { method, uri, headers, .. }, _) = request.into_parts();
    let (cost, requirement) = match (cost_header(&headers), requirement(uri.query(), &headers)) {
        (Ok(cost), Ok(requirement)) => (cost, requirement),
        (Err((field, message)), _) | (_, Err((field, message))) => return bad_request(field, &message),
    };
    let attempt = Attempt {
        started,
        credential: request::credential(&headers),
        method: request::original_method(&headers).unwrap_or_else(|| method.as_str().to_owned()),
        path: request::original_uri(&headers).unwrap_or_else(|| {
            // Under Envoy the original path follows the prefix: /v1/auth/orders/1 → /orders/1.
            let path = uri.path().strip_prefix("/v1/auth").filter(|rest| !rest.is_empty()).unwrap_or(uri.path());
            request::truncate(path, MAX_TEXT_LEN)
        }),
        client_ip: state.proxies.client_ip(peer.ip(), &headers, None),
        user_agent: request::user_agent(&headers),
        request_id: request::request_id(&headers),
        cost,
        requirement,
    };
    match state.decide(attempt).await {
        Verdict::Decided { outcome: Outcome::Allowed, record, event_id, usage } => {
            let mut response = StatusCode::OK.into_response();
            let out = response.headers_mut();
            // Room for every header below at once, rather than growing the map as they come.
            out.reserve(12);
            let mut values = HeaderValues::new();
            if let Some(usage) = &usage {
                limit_headers(out, &mut values, usage);
            }
            values.insert(out, X_TOLLGATE_KEY_ID, format_args!("{}", record.id.hyphenated()));
            values.insert(out, X_TOLLGATE_ORG_ID, format_args!("{}", record.org_id.hyphenated()));
            out.insert(X_TOLLGATE_ROLE, HeaderValue::from_static(record.role.as_str()));
            values.insert(out, X_TOLLGATE_EVENT_ID, format_args!("{}", event_id.hyphenated()));
            // A name that cannot be a header value (control characters) is left out rather than failing the request.
            values.insert(out, X_TOLLGATE_KEY_NAME, format_args!("{}", record.name));
            response
        }
        Verdict::Decided { outcome: Outcome::InsufficientScope, .. } => forbidden(),
        Verdict::Decided { outcome: Outcome::RateLimited, usage: Some(usage), .. } => too_many("rate_limited", &usage),
        Verdict::Decided { outcome: Outcome::QuotaExceeded, usage: Some(usage), .. } => {
            too_many("quota_exceeded", &usage)
        }
        Verdict::IpLimited(usage) => too_many("rate_limited", &usage),
        Verdict::Decided { .. } | Verdict::Unidentified(_) => unauthorized(),
        Verdict::Unavailable => unavailable(),
        Verdict::LimiterUnavailable => limiter_unavailable(),
    }
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
    /// Scopes the key must have (comma- or space-separated).
    #[serde(default)]
    scope: Option<String>,
    /// Least role the key must have.
    #[serde(default)]
    role: Option<Role>,
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
    /// The most restrictive limit, or the one that denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_at: Option<String>,
    /// Seconds to wait before retrying (denied requests only).
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<i64>,
}

impl VerifyAnswer {
    fn invalid(code: &'static str) -> VerifyAnswer {
        VerifyAnswer {
            valid: false,
            code,
            key_id: None,
            org_id: None,
            name: None,
            role: None,
            scopes: None,
            expires_at: None,
            event_id: None,
            limit: None,
            remaining: None,
            used: None,
            reset_at: None,
            retry_after: None,
        }
    }

    fn with_usage(mut self, usage: &Usage, denied: bool) -> VerifyAnswer {
        self.limit = Some(usage.limit);
        self.remaining = Some(usage.remaining());
        self.used = Some(usage.used);
        self.reset_at = Some(reset_at(usage));
        if denied {
            self.retry_after = Some(seconds_until(usage).max(1));
        }
        self
    }
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
        // serde's words for a body that is no object ("expected struct VerifyBody") would name our type, not the mistake.
        Err(e) if e.inner().is_data() && body.trim_ascii_start().first() != Some(&b'{') => {
            return bad_request(".", "the body must be a JSON object, such as {\"key\": \"tg_live_…\"}")
        }
        Err(e) => return bad_request(&e.path().to_string(), &e.inner().to_string()),
    };
    if body.cost == 0 || body.cost > MAX_COST {
        return bad_request("cost", &format!("must be between 1 and {MAX_COST}"));
    }
    let roles: Vec<String> = body.role.iter().map(|r| r.as_str().to_owned()).collect();
    let requirement = match requirement_from(body.scope.as_slice(), &roles) {
        Ok(requirement) => requirement,
        Err((field, message)) => return bad_request(field, &message),
    };
    let attempt = Attempt {
        started,
        credential: Credential::from_text(&body.key),
        method: request::truncate(&body.method.unwrap_or_default(), MAX_METHOD_LEN),
        path: request::truncate(&body.path.unwrap_or_default(), MAX_TEXT_LEN),
        client_ip: state.proxies.client_ip(peer.ip(), &headers, body.ip),
        user_agent: request::user_agent(&headers),
        request_id: body.request_id.map(|id| request::truncate(&id, MAX_TEXT_LEN)),
        cost: body.cost,
        requirement,
    };
    let (answer, usage) = match state.decide(attempt).await {
        Verdict::Decided { outcome, record, event_id, usage } => {
            let answer = VerifyAnswer {
                valid: outcome.is_allowed(),
                code: outcome.code(),
                key_id: Some(record.id),
                org_id: Some(record.org_id),
                name: Some(record.name.clone()),
                role: Some(record.role),
                scopes: Some(record.scopes.clone()),
                expires_at: record.expires_at,
                event_id: Some(event_id),
                ..VerifyAnswer::invalid("")
            };
            match usage {
                Some(usage) => (answer.with_usage(&usage, !outcome.is_allowed()), Some(usage)),
                None => (answer, None),
            }
        }
        Verdict::IpLimited(usage) => (VerifyAnswer::invalid("RATE_LIMITED").with_usage(&usage, true), Some(usage)),
        Verdict::Unidentified(_) => (VerifyAnswer::invalid("INVALID"), None),
        Verdict::Unavailable => return unavailable(),
        Verdict::LimiterUnavailable => return limiter_unavailable(),
    };
    let mut response = Json(answer).into_response();
    if let Some(usage) = &usage {
        limit_headers(response.headers_mut(), &mut HeaderValues::new(), usage);
    }
    response
}

fn bad_request(field: &str, message: &str) -> Response {
    let field = (field != ".").then_some(field);
    let body = json!({ "error": "invalid_request", "field": field, "message": message });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// 200 when PostgreSQL and NATS answer and the rate limiter can decide; otherwise 503 with each one's status.
///
/// Redis being away does not make the validator unready while every limit has an `open` or `local` failure
/// policy: it keeps answering correctly by those policies, and taking it out of a load balancer would only move
/// the same traffic elsewhere. Then `ratelimit` says `degraded`. With a `closed` policy, requests with limits get
/// 503, so the probe says not ready.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let postgres = async { sqlx::query("SELECT 1").execute(&state.pool).await.is_ok() };
    let redis = async {
        let Some(mut redis) = state.redis.get() else { return false };
        redis::cmd("PING").query_async::<String>(&mut redis).await.is_ok()
    };
    let nats = async { state.nats.flush().await.is_ok() };
    let within = |ok: Option<bool>| if ok == Some(true) { "ok" } else { "unavailable" };
    let (postgres, redis, nats) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, postgres),
        tokio::time::timeout(PROBE_TIMEOUT, redis),
        tokio::time::timeout(PROBE_TIMEOUT, nats),
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
        "ratelimit": limiter,
    });
    // Not ready unless all three servers answer (a degraded limiter keeps deciding by its failure policy, but a
    // load balancer should prefer a replica that sees Redis); `ratelimit` says how the limiter is deciding.
    let ready = ["postgres", "redis", "nats"].iter().all(|server| status[*server] == "ok");
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(status)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_come_from_query_and_headers_and_the_highest_role_applies() {
        let mut headers = HeaderMap::new();
        headers.append("x-tollgate-require-scope", HeaderValue::from_static("orders"));
        headers.append("x-tollgate-require-role", HeaderValue::from_static("guest"));
        let need = requirement(Some("scope=read,write&scope=a%20b&role=admin&other=1"), &headers).expect("valid");
        assert_eq!(need.scopes, ["read", "write", "a", "b", "orders"]);
        assert_eq!(need.role, Some(Role::Admin));
        assert_eq!(requirement(None, &HeaderMap::new()).expect("valid"), Requirement::default());
        assert!(requirement(Some("role=root"), &HeaderMap::new()).is_err());
    }

    #[test]
    fn costs_are_bounded() {
        let cost = |v: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-tollgate-cost", HeaderValue::from_static(v));
            cost_header(&headers)
        };
        assert_eq!(cost_header(&HeaderMap::new()), Ok(1));
        assert_eq!(cost(" 7 "), Ok(7));
        assert!(cost("0").is_err() && cost("1001").is_err() && cost("-1").is_err() && cost("x").is_err());
        assert!(cost("").is_err() && cost("2,").is_err());
    }

    #[test]
    fn of_several_costs_the_largest_counts_so_a_client_cannot_undercut_its_gateway() {
        let costs = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append("x-tollgate-cost", HeaderValue::from_static(v));
            }
            cost_header(&headers)
        };
        assert_eq!(costs(&["1", "10"]), Ok(10));
        assert_eq!(costs(&["10", "1"]), Ok(10));
        assert_eq!(costs(&["1, 10"]), Ok(10));
        assert!(costs(&["10", "0"]).is_err() && costs(&["1", "x"]).is_err());
    }

    #[test]
    fn reset_times_round_up_to_whole_seconds() {
        let usage = |reset_at_us, now_us| Usage {
            kind: LimitKind::Key,
            limit: 5,
            used: 5,
            window_seconds: 60,
            reset_at_us,
            now_us,
        };
        assert_eq!(seconds_until(&usage(10_000_001, 9_000_000)), 2);
        assert_eq!(seconds_until(&usage(10_000_000, 9_000_000)), 1);
        assert_eq!(seconds_until(&usage(9_000_000, 10_000_000)), 0);
        assert_eq!(reset_at(&usage(1_795_000_000_000_001, 0)), "2026-11-18T11:06:41Z");
    }
}
