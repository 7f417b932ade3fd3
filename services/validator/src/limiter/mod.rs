//! Rate limits and the monthly quota: every limit that applies to a request, decided in one Redis round trip.
//!
//! A [`Plan`] lists the limits that apply (the key's own per-minute limit, its tier's windows, its organization's
//! per-minute limit, the organization's monthly quota). [`Limiter::decide`] runs them through one Lua script
//! (`EVALSHA`) that uses Redis's clock, so validators with skewed clocks agree, and that is all-or-nothing: a denied
//! request consumes nothing. A plan with no limits makes no Redis call.
//!
//! Concurrent decisions share a script call (`script.rs`): a few calls are in flight at a time, the requests that
//! arrive meanwhile queue up, and the next call decides a batch of them, in order (still one round trip per request,
//! at a fraction of the per-call cost).
//!
//! Redis trouble never makes a request hang: each call has a tight timeout, and a circuit breaker stops calling
//! after consecutive failed calls, lets one request probe after a cooldown and closes again when the probe succeeds.
//! Meanwhile each limit follows its failure policy: `open` allows, `closed` denies with 503, `local` enforces the
//! limit ÷ replicas from an in-process limiter (the monthly quota has no local counterpart: `local` allows it).
//!
//! - `plan.rs`: which limits apply to a key;
//! - `script.rs`, `limit.lua`: the Redis calls;
//! - `window.rs`: the rolling-window arithmetic, which the script mirrors and `local.rs`, the fallback, runs here;
//! - `verdict.rs`: from where each limit stands to one decision;
//! - `breaker.rs`: the circuit breaker;
//! - `clock.rs`: Redis's clock, which the validator decides by too (a key's expiry, the quota's month).

mod breaker;
mod clock;
mod local;
mod plan;
mod script;
mod verdict;
mod window;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

use tollgate_shared::config::{FailurePolicies, FailurePolicy, LimiterArgs};
use tollgate_shared::connect::BackgroundRedis;
use tollgate_shared::metrics::{
    start_labeled_at_zero, LabeledCounter, RATELIMIT_BREAKER_OPEN, RATELIMIT_DECISIONS, RATELIMIT_DEGRADED,
    RATELIMIT_REDIS_DURATION, RATELIMIT_REDIS_ERRORS, RATELIMIT_SHADOW_DENIALS,
};

use breaker::Breaker;
use clock::RedisClock;
use local::LocalLimiter;
use plan::WindowLimit;
pub use plan::{client_network, quota_key, LimitKind, Plan};
use script::{CallError, Calls};

/// Where one limit stands after a decision: what the rate-limit headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub kind: LimitKind,
    pub limit: u64,
    /// Units counted, this request included when it was admitted.
    pub used: u64,
    /// The window's length (for the quota: its calendar month's).
    pub window_seconds: u64,
    /// Admitted: when the oldest counted unit leaves. Denied: when a request of this cost would fit.
    pub reset_at_us: i64,
    /// When the limiter decided, by its clock (Redis's), so `Retry-After` does not depend on this host's clock.
    pub now_us: i64,
    /// Denied because the request weighs more than the whole limit: no wait lets it through.
    pub never_fits: bool,
}

impl Usage {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

/// The limiter's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Within every enforced limit. `usage` is the most restrictive limit (none when no limit applies);
    /// `shadow` names a shadow-mode limit that would have denied.
    Allowed { usage: Option<Usage>, shadow: Option<LimitKind>, now_us: i64 },
    /// Over `usage.kind`'s limit; nothing was counted.
    Denied { usage: Usage, now_us: i64 },
    /// Redis cannot decide and a limit's policy is `closed`.
    Unavailable,
}

/// How the limiter stands, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Redis answers.
    Ok,
    /// Redis does not answer (breaker open); decisions follow the failure policies.
    Degraded,
}

pub struct Limiter {
    calls: Calls,
    policies: FailurePolicies,
    replicas: u64,
    /// Shared with the task making the script calls, which tells it each call's outcome.
    breaker: Arc<Breaker>,
    local: LocalLimiter,
    /// Set by the task making the script calls, from each reply.
    clock: Arc<RedisClock>,
    /// Decisions by the limit that decided and result.
    decisions: LabeledCounter<2>,
    redis_duration: metrics::Histogram,
}

impl Limiter {
    /// Must be called within the Tokio runtime: it starts the task that makes the script calls.
    /// `prefix` begins the name of every counter.
    pub fn new(redis: BackgroundRedis, args: &LimiterArgs, prefix: &str) -> Limiter {
        let breaker = Arc::new(Breaker::new(args.breaker_failures, args.breaker_cooldown));
        let clock = Arc::new(RedisClock::default());
        let calls = Calls::start(redis, args.redis_timeout, prefix, breaker.clone(), clock.clone());
        start_rare_series_at_zero();
        Limiter {
            calls,
            policies: args.failure_policy,
            replicas: u64::from(args.replicas.max(1)),
            breaker,
            local: LocalLimiter::default(),
            clock,
            decisions: LabeledCounter::new(RATELIMIT_DECISIONS, ["limit", "result"], expected_decisions()),
            redis_duration: metrics::histogram!(RATELIMIT_REDIS_DURATION),
        }
    }

    /// The time by Redis's clock (see [`RedisClock`]).
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn health(&self) -> Health {
        if self.breaker.is_closed() {
            Health::Ok
        } else {
            Health::Degraded
        }
    }

    /// Decides `cost` more units against every limit of `plan`, all or nothing.
    pub async fn decide(&self, plan: Plan, cost: u32) -> Decision {
        if plan.is_empty() {
            return Decision::Allowed { usage: None, shadow: None, now_us: now_us() };
        }
        // Shared with the queued call rather than copied: both read it.
        let plan = Arc::new(plan);
        let decision = if self.breaker.permit() {
            let started = Instant::now();
            match self.calls.call(plan.clone(), cost, started).await {
                Ok(reply) => {
                    self.redis_duration.record(started.elapsed().as_secs_f64());
                    reply.interpret(&plan, cost)
                }
                // Logged, and told to the breaker, once per call (see `script::decide_batch`), not once per decision.
                Err(e) => {
                    metrics::counter!(RATELIMIT_REDIS_ERRORS, "kind" => e.label()).increment(1);
                    self.degraded(&plan, cost)
                }
            }
        } else {
            self.degraded(&plan, cost)
        };
        self.record(&decision);
        decision
    }

    fn record(&self, decision: &Decision) {
        match decision {
            Decision::Allowed { usage, shadow, .. } => {
                self.decisions.increment([usage.map_or("none", |u| u.kind.as_str()), "allowed"]);
                if let Some(shadow) = shadow {
                    metrics::counter!(RATELIMIT_SHADOW_DENIALS, "limit" => shadow.as_str()).increment(1);
                }
            }
            Decision::Denied { usage, .. } => self.decisions.increment([usage.kind.as_str(), "denied"]),
            Decision::Unavailable => self.decisions.increment(["none", "unavailable"]),
        }
    }

    /// Decides without Redis, limit by limit according to each one's failure policy.
    fn degraded(&self, plan: &Plan, cost: u32) -> Decision {
        let policy = |kind: LimitKind| match kind {
            LimitKind::Key => self.policies.key,
            LimitKind::Tier => self.policies.tier,
            LimitKind::Org => self.policies.org,
            LimitKind::Quota => self.policies.quota,
            LimitKind::Ip => self.policies.ip,
        };
        // A shadow limit never refuses, so its policy cannot be what decides.
        let mut used: Vec<FailurePolicy> =
            plan.windows.iter().filter(|w| !w.shadow).map(|w| policy(w.kind())).collect();
        if plan.quota.as_ref().is_some_and(|q| !q.shadow) {
            used.push(policy(LimitKind::Quota));
        }
        // Counted once, under the policy that decides: a closed limit refuses whatever the others say, then a local
        // one may deny, and open limits alone let it through.
        let deciding = [FailurePolicy::Closed, FailurePolicy::Local, FailurePolicy::Open]
            .into_iter()
            .find(|p| used.contains(p))
            .unwrap_or(FailurePolicy::Open);
        metrics::counter!(RATELIMIT_DEGRADED, "policy" => deciding.as_str()).increment(1);
        if deciding == FailurePolicy::Closed {
            return Decision::Unavailable;
        }
        let local: Vec<WindowLimit> = plan
            .windows
            .iter()
            .filter(|w| policy(w.kind()) == FailurePolicy::Local)
            .map(|w| WindowLimit { limit: (w.limit / self.replicas).max(1), ..*w })
            .collect();
        match self.local.decide(&local, cost, now_us()) {
            // A request heavier than this process's share of a limit may well fit the limit once Redis is back.
            Decision::Denied { usage, now_us } => {
                Decision::Denied { usage: Usage { never_fits: false, ..usage }, now_us }
            }
            decision => decision,
        }
    }
}

fn now_us() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// The counters of rare events start at zero (see [`start_labeled_at_zero`]); so does the breaker's gauge.
fn start_rare_series_at_zero() {
    start_labeled_at_zero(RATELIMIT_DEGRADED, "policy", FailurePolicy::ALL.map(FailurePolicy::as_str));
    start_labeled_at_zero(RATELIMIT_REDIS_ERRORS, "kind", CallError::LABELS);
    // The limits that can be in shadow mode: a tier's, and an organization's rate and quota.
    let shadowed = [LimitKind::Tier, LimitKind::Org, LimitKind::Quota];
    start_labeled_at_zero(RATELIMIT_SHADOW_DENIALS, "limit", shadowed.map(LimitKind::as_str));
    metrics::gauge!(RATELIMIT_BREAKER_OPEN).set(0.0);
}

/// The label pairs of `tollgate_ratelimit_decisions_total` (see [`Limiter::record`]).
fn expected_decisions() -> impl Iterator<Item = [&'static str; 2]> {
    let limits = LimitKind::ALL.into_iter().map(LimitKind::as_str).chain(["none"]);
    limits.flat_map(|limit| [[limit, "allowed"], [limit, "denied"]]).chain([["none", "unavailable"]])
}
