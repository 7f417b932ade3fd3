//! The HTTP API: `/v1/auth` for gateways, `/v1/verify` for services, and the health probes.
//!
//! Both endpoints share one decision path ([`AppState::decide`]): the key's own state, then what the route requires
//! (scopes, role), then every rate limit and the quota in one limiter call; bad-key answers are limited per client
//! IP.
//!
//! - `auth.rs`, `verify.rs`: the two endpoints, each reading its request into an [`Attempt`];
//! - `params.rs`: a request's cost and the scopes and role its route requires;
//! - `answers.rs`: the rate-limit headers and the bodies of refusals;
//! - `blocked_ips.rs`: clients past the bad-key limit, answered without a lookup until their block passes;
//! - `probes.rs`: `/healthz` and `/readyz`.

mod answers;
mod auth;
mod blocked_ips;
mod params;
mod probes;
mod verify;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::header::CACHE_CONTROL;
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use chrono::DateTime;
use uuid::Uuid;

use tollgate_shared::domain::Outcome;
use tollgate_shared::event::UsageEvent;
use tollgate_shared::metrics::{start_at_zero, LabeledCounter, IP_FAILURES_LIMITED, VERIFY_DURATION, VERIFY_REQUESTS};

use crate::decision::{decide, Requirement};
use crate::keys::{KeyCache, KeyRecord, LookupError};
use crate::limiter::{client_network, Decision, LimitKind, Limiter, Plan, Usage};
use crate::publisher::EventQueue;
use crate::request::{Credential, TrustedProxies};
pub use blocked_ips::BlockedIps;
pub use probes::Readiness;

/// The `outcome` label of a request refused before any decision (400, 413): what a gateway or client sent could not
/// be read.
const INVALID_REQUEST: &str = "invalid_request";
/// Largest `/v1/verify` body; a request is a key and a few short fields.
const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub keys: KeyCache,
    pub events: EventQueue,
    pub proxies: TrustedProxies,
    pub pool: sqlx::PgPool,
    pub redis: tollgate_shared::connect::BackgroundRedis,
    pub nats: async_nats::Client,
    pub limiter: Limiter,
    pub redis_prefix: String,
    /// The JetStream stream usage events go to (`/readyz` says whether it is there).
    pub usage_stream: String,
    /// 401s per client IP per minute before 429; 0 = no limit.
    pub ip_failures_per_minute: u32,
    pub blocked_ips: BlockedIps,
    /// Longest a `/v1/verify` body may take to arrive.
    pub read_timeout: std::time::Duration,
    pub metrics: RequestMetrics,
    /// Lookups of keys not cached that PostgreSQL did not answer in time: logged at most once a second.
    pub lookup_failures: LogThrottle,
    /// Shutting down: `/healthz` answers 503 so that load balancers stop sending requests.
    pub draining: AtomicBool,
    pub readiness: Readiness,
}

/// At most one log line a second for a failure that every request of a flood would otherwise log (each is counted in
/// the metrics all the same).
#[derive(Default)]
pub struct LogThrottle(AtomicU64);

impl LogThrottle {
    /// Whether to log now: yes for the first call in each second.
    pub fn allows(&self) -> bool {
        let second = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        self.0.swap(second, Ordering::Relaxed) != second
    }
}

/// Handles of the metrics every request updates, taken once (see [`LabeledCounter`]).
pub struct RequestMetrics {
    requests: LabeledCounter<1>,
    duration: metrics::Histogram,
}

impl RequestMetrics {
    pub fn new() -> RequestMetrics {
        let outcomes =
            Outcome::ALL.iter().map(|o| o.as_str()).chain(Verdict::UNDECIDED_LABELS).chain([INVALID_REQUEST]);
        start_at_zero(&[IP_FAILURES_LIMITED]);
        RequestMetrics {
            requests: LabeledCounter::new(VERIFY_REQUESTS, ["outcome"], outcomes.map(|o| [o])),
            duration: metrics::histogram!(VERIFY_DURATION),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/auth", any(auth::auth))
        // Envoy's HTTP ext_authz appends the original path to its path prefix; a catch-all matches no empty rest,
        // so the original path `/` needs a route of its own.
        .route("/v1/auth/", any(auth::auth))
        .route("/v1/auth/{*original_path}", any(auth::auth))
        .route("/v1/verify", post(verify::verify))
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .fallback(answers::not_found)
        .method_not_allowed_fallback(answers::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(no_store))
        .with_state(state)
}

/// No cache between a client and Tollgate may keep an answer: an allowed one served again would let the next
/// request through unchecked and uncounted (an nginx `proxy_cache` inherited by the auth subrequest, say).
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
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
    /// The client IP sent too many bad keys: 429 instead of 401, and for any key not cached while it is blocked.
    IpLimited(Usage),
    /// The key is not cached and PostgreSQL did not answer.
    Unavailable,
    /// No usage event can be recorded: NATS is away and the spool is full (policy `block`).
    SpoolFull,
    /// Redis cannot decide and the limit's failure policy is `closed`.
    LimiterUnavailable,
}

impl Verdict {
    /// The metric labels of verdicts that are not a key's outcome (see [`Verdict::label`]).
    const UNDECIDED_LABELS: [&'static str; 7] =
        ["missing", "malformed", "unknown", "ip_limited", "unavailable", "spool_full", "limiter_unavailable"];

    /// The `outcome` label of `tollgate_verify_requests_total`.
    fn label(&self) -> &'static str {
        match self {
            Verdict::Unidentified(reason) => reason,
            Verdict::Decided { outcome, .. } => outcome.as_str(),
            Verdict::IpLimited(_) => "ip_limited",
            Verdict::Unavailable => "unavailable",
            Verdict::SpoolFull => "spool_full",
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
        if let Some(usage) = self.blocked_ips.check(self.counted_client(client_ip)) {
            // The answer would be 429 all the same, save for a key held here; anything else is not looked up.
            if !matches!(&attempt.credential, Credential::Key(key) if self.keys.holds(&key.hash())) {
                metrics::counter!(IP_FAILURES_LIMITED).increment(1);
                return self.finish(started, Verdict::IpLimited(usage));
            }
        }
        let verdict = self.decide_key(attempt).await;
        let verdict = if verdict.is_unauthorized() { self.count_failure(client_ip, verdict).await } else { verdict };
        self.finish(started, verdict)
    }

    /// Whom a bad key counts against: the client's network (see [`client_network`]), but a trusted proxy's own address
    /// alone. That stands for the clients behind the proxy that it could not name, not for the proxy's neighbours.
    fn counted_client(&self, ip: IpAddr) -> IpAddr {
        if self.proxies.trusts(ip) {
            ip.to_canonical()
        } else {
            client_network(ip)
        }
    }

    /// Counts a bad-key answer against the client (as [`AppState::counted_client`] names it); past the limit the answer
    /// becomes 429, and the client is blocked (see [`BlockedIps`]) unless it is a trusted proxy. A valid key is never
    /// counted; once the client is blocked, only a key this validator holds is looked at.
    async fn count_failure(&self, ip: IpAddr, verdict: Verdict) -> Verdict {
        if self.ip_failures_per_minute == 0 {
            return verdict;
        }
        let client = self.counted_client(ip);
        let plan = Plan::for_ip_failures(client, self.ip_failures_per_minute);
        match self.limiter.decide(plan, 1).await {
            Decision::Denied { usage, .. } => {
                metrics::counter!(IP_FAILURES_LIMITED).increment(1);
                // A proxy's own address stands for every client behind it (no X-Forwarded-For, or one it could not
                // read): blocking it would refuse them all.
                if !self.proxies.trusts(ip) {
                    self.blocked_ips.block(client, usage);
                }
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
            // Logged once (by the refresher, or by the read that failed), not once per request.
            Err(LookupError::DatabaseAway | LookupError::ReadFailedLately | LookupError::Unreadable(_)) => {
                return Verdict::Unavailable;
            }
            Err(e) => {
                if self.lookup_failures.allows() {
                    tracing::error!(
                        error = %e,
                        "cannot look up a key that is not cached (said at most once a second; every such request is \
                         counted in tollgate_verify_requests_total{{outcome=\"unavailable\"}})"
                    );
                }
                return Verdict::Unavailable;
            }
        };
        // Redis's clock, as every validator reads it: they agree on expiry and on the quota's month.
        let mut now = self.limiter.now();
        let mut outcome = decide(&record, now);
        if outcome == Outcome::Allowed && !attempt.requirement.is_met_by(&record) {
            outcome = Outcome::InsufficientScope;
        }
        // Room for the event first: if none can be had (a full spool, policy `block`), no decision either, and no
        // limit counts a request that gets 503.
        let Ok(slot) = self.events.reserve().await else {
            return Verdict::SpoolFull;
        };
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
        slot.send(UsageEvent {
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
        });
        Verdict::Decided { outcome, record, event_id, usage }
    }

    /// Counts a request refused before any decision, and gives its answer back.
    fn refused(&self, answer: Response) -> Response {
        self.metrics.requests.increment([INVALID_REQUEST]);
        answer
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
