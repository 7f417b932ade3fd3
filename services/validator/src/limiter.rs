//! Rate limits and the monthly quota: every limit that applies to a request, decided in one Redis round trip.
//!
//! A [`Plan`] lists the limits that apply (the key's own per-minute limit, its tier's windows, its organization's
//! per-minute limit, the organization's monthly quota). [`Limiter::decide`] runs them through one Lua script
//! (`EVALSHA`) that uses Redis's clock, so validators with skewed clocks agree, and that is all-or-nothing: a denied
//! request consumes nothing. A plan with no limits makes no Redis call.
//!
//! Concurrent decisions share a script call: a few calls are in flight at a time ([`CALLS_IN_FLIGHT`]), the requests
//! that arrive meanwhile queue up, and the next call decides up to [`MAX_BATCH`] of them, in order (still one round
//! trip per request, at a fraction of the per-call cost), once the requests already readable have joined it
//! ([`gather`]).
//!
//! Redis trouble never makes a request hang: each call has a tight timeout, and a circuit breaker stops calling
//! after consecutive failed calls, lets one request probe after a cooldown and closes again when the probe succeeds.
//! Meanwhile each limit follows its failure policy: `open` allows, `closed` denies with 503, `local` enforces the
//! limit ÷ replicas from an in-process limiter (the monthly quota has no local counterpart: `local` allows it).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

use tollgate_shared::config::{FailurePolicies, FailurePolicy, LimiterArgs};
use tollgate_shared::connect::BackgroundRedis;
use tollgate_shared::metrics::{
    start_labeled_at_zero, LabeledCounter, RATELIMIT_BREAKER_OPEN, RATELIMIT_DECISIONS, RATELIMIT_DEGRADED,
    RATELIMIT_REDIS_DURATION, RATELIMIT_REDIS_ERRORS, RATELIMIT_SHADOW_DENIALS,
};

use crate::keys::KeyRecord;
use crate::window::{Counter, Window, BUCKETS};

const SCRIPT: &str = include_str!("limit.lua");
/// Decisions per script call at most: bounds the script's run time (Redis runs nothing else meanwhile), and splits a
/// burst of requests into calls that Redis and the validator work on in turn (see [`CALLS_IN_FLIGHT`]).
const MAX_BATCH: usize = 32;
/// Script calls in flight at once. With one, the validator and Redis took turns under load: a burst of requests
/// waited for one call deciding them all, and the validator then answered them all while Redis idled. With two, Redis
/// runs one call while the validator answers the other's requests and reads new ones (`tollgate bench verify`, in
/// alternated runs: 38.7–42.0 % of the trivial handler's throughput with one, 43.3–49.2 % with two; BENCHMARKS.md,
/// 2026-12-06).
const CALLS_IN_FLIGHT: usize = 2;
/// Decisions waiting for a call at most: past that, a decision follows its failure policy at once (overloaded) rather
/// than wait out its timeout in the queue.
const QUEUED_AT_MOST: usize = 1024;
/// Scheduler ticks a script call waits at most for more decisions to join it (see [`gather`]).
const GATHER_YIELDS: usize = 8;
/// Counters of the local fallback limiter kept before idle ones are swept.
const LOCAL_SWEEP_AT: usize = 100_000;

/// Which limit decided; a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Key,
    Tier,
    Org,
    Quota,
    Ip,
}

impl LimitKind {
    const ALL: [LimitKind; 5] = [LimitKind::Key, LimitKind::Tier, LimitKind::Org, LimitKind::Quota, LimitKind::Ip];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Key => "key",
            LimitKind::Tier => "tier",
            LimitKind::Org => "org",
            LimitKind::Quota => "quota",
            LimitKind::Ip => "ip",
        }
    }
}

/// Whose requests a window counts. With the window's length it names the counter in Redis (see [`CounterKey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Key(Uuid),
    /// A key under its tier's main window.
    TierWindow(Uuid),
    /// A key under its tier's burst window.
    TierBurst(Uuid),
    Org(Uuid),
    /// A client IP's bad-key answers.
    Ip(IpAddr),
}

impl Subject {
    pub fn kind(self) -> LimitKind {
        match self {
            Subject::Key(_) => LimitKind::Key,
            Subject::TierWindow(_) | Subject::TierBurst(_) => LimitKind::Tier,
            Subject::Org(_) => LimitKind::Org,
            Subject::Ip(_) => LimitKind::Ip,
        }
    }
}

/// A rolling-window limit on one counter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowLimit {
    pub subject: Subject,
    pub limit: u64,
    pub seconds: u32,
    pub shadow: bool,
}

impl WindowLimit {
    pub fn kind(&self) -> LimitKind {
        self.subject.kind()
    }
}

/// A window's Redis key, `{prefix}window:{scope}:{id}:{seconds}`: the length is part of the name, since buckets of
/// another width would be misread. Written straight into the script call (no string per request).
struct CounterKey<'a> {
    prefix: &'a str,
    subject: Subject,
    seconds: u32,
}

impl fmt::Display for CounterKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, seconds) = (self.prefix, self.seconds);
        match self.subject {
            Subject::Key(id) => write!(f, "{prefix}window:key:{id}:{seconds}"),
            Subject::TierWindow(id) => write!(f, "{prefix}window:tierw:{id}:{seconds}"),
            Subject::TierBurst(id) => write!(f, "{prefix}window:tierb:{id}:{seconds}"),
            Subject::Org(id) => write!(f, "{prefix}window:org:{id}:{seconds}"),
            Subject::Ip(ip) => write!(f, "{prefix}window:ip:{ip}:{seconds}"),
        }
    }
}

impl redis::ToRedisArgs for CounterKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

/// The organization's monthly quota: read here, counted by the workers.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaLimit {
    pub redis_key: String,
    pub limit: u64,
    /// Start of next month (UTC), in microseconds since the epoch.
    pub reset_at_us: i64,
    pub shadow: bool,
}

/// The limits that apply to one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub windows: Vec<WindowLimit>,
    pub quota: Option<QuotaLimit>,
}

fn positive(n: Option<i64>) -> Option<u64> {
    n.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0)
}

fn seconds(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(1).max(1)
}

/// The Redis key of an organization's monthly quota counter (the workers maintain it): UTC calendar month.
pub fn quota_key(prefix: &str, org_id: Uuid, now: DateTime<Utc>) -> String {
    format!("{prefix}quota:{}:{:04}-{:02}", org_id.hyphenated(), now.year(), now.month())
}

impl Plan {
    /// Every limit that applies to a key, given its record (which carries its tier's and organization's limits).
    pub fn for_key(record: &KeyRecord, prefix: &str, now: DateTime<Utc>) -> Plan {
        let key = positive(record.custom_rate_limit_per_minute.map(i64::from)).map(|limit| WindowLimit {
            subject: Subject::Key(record.id),
            limit,
            seconds: 60,
            shadow: false,
        });
        let tier = [
            (Subject::TierWindow(record.id), record.tier_window_limit, record.tier_window_seconds),
            (Subject::TierBurst(record.id), record.tier_burst_limit, record.tier_burst_seconds),
        ]
        .into_iter()
        .filter_map(|(subject, limit, secs)| {
            let limit = positive(limit)?;
            Some(WindowLimit { subject, limit, seconds: seconds(secs), shadow: record.tier_shadow })
        });
        let org = positive(record.org_rate_limit_per_minute.map(i64::from)).map(|limit| WindowLimit {
            subject: Subject::Org(record.org_id),
            limit,
            seconds: 60,
            shadow: record.org_shadow,
        });
        let quota = positive(record.org_monthly_request_limit).map(|limit| QuotaLimit {
            redis_key: quota_key(prefix, record.org_id, now),
            limit,
            reset_at_us: next_month(now).timestamp_micros(),
            shadow: record.org_shadow,
        });
        Plan { windows: key.into_iter().chain(tier).chain(org).collect(), quota }
    }

    /// The bad-key limit of one client IP.
    pub fn for_ip_failures(ip: IpAddr, per_minute: u32) -> Plan {
        // An IPv4 client seen through an IPv6 socket is the same client.
        let limit = WindowLimit {
            subject: Subject::Ip(ip.to_canonical()),
            limit: u64::from(per_minute),
            seconds: 60,
            shadow: false,
        };
        Plan { windows: vec![limit], quota: None }
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.quota.is_none()
    }

    /// Values of this plan's part of the script's reply: per window used and at, then the quota's used.
    fn reply_len(&self) -> usize {
        2 * self.windows.len() + usize::from(self.quota.is_some())
    }
}

fn next_month(now: DateTime<Utc>) -> DateTime<Utc> {
    let (year, month) = if now.month() == 12 { (now.year() + 1, 1) } else { (now.year(), now.month() + 1) };
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single().unwrap_or(now)
}

/// Where one limit stands after a decision: what the rate-limit headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub kind: LimitKind,
    pub limit: u64,
    /// Units counted, this request included when it was admitted.
    pub used: u64,
    /// The window's length (for the quota: seconds until the month ends).
    pub window_seconds: u64,
    /// Admitted: when the oldest counted unit leaves. Denied: when a request of this cost would fit.
    pub reset_at_us: i64,
    /// When the limiter decided, by its clock (Redis's), so `Retry-After` does not depend on this host's clock.
    pub now_us: i64,
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
    calls: mpsc::Sender<Pending>,
    policies: FailurePolicies,
    replicas: u64,
    /// Shared with the task making the script calls, which tells it each call's outcome.
    breaker: Arc<Breaker>,
    /// The fallback's counters, each with its window.
    local: Mutex<HashMap<(Subject, u32), (Window, Counter)>>,
    /// Decisions by the limit that decided and result.
    decisions: LabeledCounter<2>,
    redis_duration: metrics::Histogram,
}

/// Why the Redis call did not decide.
#[derive(Debug, Clone, thiserror::Error)]
enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("too many decisions are waiting for Redis")]
    Overloaded,
    #[error("{0}")]
    Redis(Arc<redis::RedisError>),
    #[error("unexpected reply of {0} values")]
    Reply(usize),
    #[error("the task making the script calls has stopped")]
    Stopped,
    #[error("not connected to Redis yet")]
    NotConnected,
}

impl CallError {
    /// Every value of [`CallError::label`].
    const LABELS: [&'static str; 2] = ["timeout", "error"];

    /// Its `kind` label on the Redis errors counter.
    fn label(&self) -> &'static str {
        match self {
            CallError::Timeout | CallError::Overloaded => "timeout",
            CallError::Redis(_) | CallError::Reply(_) | CallError::Stopped | CallError::NotConnected => "error",
        }
    }
}

/// One decision waiting for the next script call.
struct Pending {
    plan: Arc<Plan>,
    cost: u32,
    /// When the request began to wait: it is answered within the timeout from then, queueing included.
    since: Instant,
    reply: oneshot::Sender<Result<Reply, CallError>>,
}

/// A script call's reply, shared by its decisions: the clock, then each decision's values from `at` on.
struct Reply {
    values: Arc<Vec<i64>>,
    at: usize,
}

impl Reply {
    fn now(&self) -> i64 {
        self.values[0]
    }

    fn own(&self) -> &[i64] {
        &self.values[self.at..]
    }
}

impl Limiter {
    /// Must be called within the Tokio runtime: it starts the task that makes the script calls.
    /// `prefix` begins the name of every counter (see [`CounterKey`]).
    pub fn new(redis: BackgroundRedis, args: &LimiterArgs, prefix: &str) -> Limiter {
        let (calls, pending) = mpsc::channel(QUEUED_AT_MOST);
        let breaker = Arc::new(Breaker::new(args.breaker_failures, args.breaker_cooldown));
        tokio::spawn(make_calls(pending, redis, args.redis_timeout, prefix.to_owned(), breaker.clone()));
        start_rare_series_at_zero();
        Limiter {
            calls,
            policies: args.failure_policy,
            replicas: u64::from(args.replicas.max(1)),
            breaker,
            local: Mutex::new(HashMap::new()),
            decisions: LabeledCounter::new(RATELIMIT_DECISIONS, ["limit", "result"], expected_decisions()),
            redis_duration: metrics::histogram!(RATELIMIT_REDIS_DURATION),
        }
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
            match self.call(plan.clone(), cost, started).await {
                Ok(reply) => {
                    self.redis_duration.record(started.elapsed().as_secs_f64());
                    interpret(&plan, cost, reply.now(), reply.own())
                }
                // Logged, and told to the breaker, once per call (see `decide_batch`), not once per decision.
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

    /// Queues a decision for the next script call. The task making the calls answers it within the timeout (see
    /// [`make_calls`]): one deadline per call rather than a timer per request.
    async fn call(&self, plan: Arc<Plan>, cost: u32, since: Instant) -> Result<Reply, CallError> {
        let (reply, answer) = oneshot::channel();
        self.calls.try_send(Pending { plan, cost, since, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CallError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => CallError::Stopped,
        })?;
        answer.await.map_err(|_| CallError::Stopped)?
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
        let mut used: Vec<FailurePolicy> = plan.windows.iter().map(|w| policy(w.kind())).collect();
        if plan.quota.is_some() {
            used.push(policy(LimitKind::Quota));
        }
        for p in [FailurePolicy::Open, FailurePolicy::Closed, FailurePolicy::Local] {
            if used.contains(&p) {
                metrics::counter!(RATELIMIT_DEGRADED, "policy" => p.as_str()).increment(1);
            }
        }
        if used.contains(&FailurePolicy::Closed) {
            return Decision::Unavailable;
        }
        let local: Vec<WindowLimit> = plan
            .windows
            .iter()
            .filter(|w| policy(w.kind()) == FailurePolicy::Local)
            .map(|w| WindowLimit { limit: (w.limit / self.replicas).max(1), ..*w })
            .collect();
        self.decide_locally(&local, cost, now_us())
    }

    /// The same arithmetic as the script, on this process's own counters.
    fn decide_locally(&self, windows: &[WindowLimit], cost: u32, now: i64) -> Decision {
        let cost = u64::from(cost);
        // A poisoned lock only means another request panicked mid-update; the counters are still usable.
        let mut counters = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if counters.len() >= LOCAL_SWEEP_AT {
            counters.retain(|_, (window, counter)| !counter.is_idle(*window, now));
        }
        let mut checks = Vec::with_capacity(windows.len());
        for w in windows {
            let geometry = Window::seconds(w.seconds);
            let (_, counter) = counters.entry((w.subject, w.seconds)).or_insert_with(|| (geometry, Counter::default()));
            checks.push(counter.check(geometry, now, w.limit, cost));
        }
        let replies: Vec<WindowReply> =
            checks.iter().map(|c| WindowReply { used: c.used, fits: c.fits, at_us: c.at_us }).collect();
        let plan = Plan { windows: windows.to_vec(), quota: None };
        let decision = decide_from(&plan, cost, now, &replies, None);
        if matches!(decision, Decision::Allowed { .. }) {
            for (w, check) in windows.iter().zip(&checks) {
                if check.fits {
                    if let Some((geometry, counter)) = counters.get_mut(&(w.subject, w.seconds)) {
                        counter.add(*geometry, now, cost);
                    }
                }
            }
        }
        decision
    }
}

/// Makes script calls, up to [`CALLS_IN_FLIGHT`] at a time: each decides the decisions queued since the previous one
/// went out, [`MAX_BATCH`] at most. Redis runs the calls one after another, each atomically, so that a call's decisions
/// see the counts of every call it ran after. Every decision is answered within `timeout` of when it was queued: a call
/// gets until its oldest decision's deadline, and a decision that waited that long in the queue is answered at once.
async fn make_calls(
    mut pending: mpsc::Receiver<Pending>,
    redis: BackgroundRedis,
    timeout: Duration,
    prefix: String,
    breaker: Arc<Breaker>,
) {
    let script = Arc::new(redis::Script::new(SCRIPT));
    let prefix: Arc<str> = prefix.into();
    let slots = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    // The semaphore is never closed: the loop ends when the limiter (every sender) is gone.
    while let Ok(slot) = slots.clone().acquire_owned().await {
        // A free slot first, so that while every call is in flight decisions queue up and fill the next one.
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if pending.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        gather(&mut pending, &mut batch).await;
        let (script, prefix, redis, breaker) = (script.clone(), prefix.clone(), redis.get(), breaker.clone());
        tokio::spawn(async move {
            decide_batch(&script, &prefix, redis, batch, timeout, &breaker).await;
            drop(slot);
        });
    }
}

/// Decides a batch in one script call, answers each of its decisions, and tells the breaker how the call went: one
/// slow call is one failure, however many requests it carried (counted per decision, a single call that timed out
/// opened the breaker and sent a whole cooldown of traffic to the failure policies).
async fn decide_batch(
    script: &redis::Script,
    prefix: &str,
    redis: Option<ConnectionManager>,
    mut batch: Vec<Pending>,
    timeout: Duration,
    breaker: &Breaker,
) {
    let now = Instant::now();
    for late in batch.extract_if(.., |p| now >= p.since + timeout) {
        let _ = late.reply.send(Err(CallError::Timeout));
    }
    // Requests that gave up waiting need no decision: deciding them would count units nobody was granted.
    batch.retain(|p| !p.reply.is_closed());
    let Some(oldest) = batch.iter().map(|p| p.since).min() else { return };
    let call = script_call(script, prefix, &batch);
    let expected = 1 + batch.iter().map(|p| p.plan.reply_len()).sum::<usize>();
    let reply = match redis {
        None => Err(CallError::NotConnected),
        Some(mut redis) => {
            match tokio::time::timeout_at((oldest + timeout).into(), run(script, &call, &mut redis)).await {
                Err(_) => Err(CallError::Timeout),
                Ok(Err(e)) => Err(CallError::Redis(Arc::new(e))),
                Ok(Ok(values)) if values.len() != expected => Err(CallError::Reply(values.len())),
                Ok(Ok(values)) => Ok(Arc::new(values)),
            }
        }
    };
    match &reply {
        Ok(_) => breaker.success(),
        Err(e) => {
            tracing::warn!(
                error = %e,
                decisions = batch.len(),
                "rate limiter: a Redis call failed; its decisions follow the failure policy"
            );
            breaker.failure();
        }
    }
    let mut at = 1;
    for p in batch {
        let answer = reply.as_ref().map(|values| Reply { values: values.clone(), at }).map_err(Clone::clone);
        at += p.plan.reply_len();
        // A requester that timed out meanwhile is gone; nothing to tell it.
        let _ = p.reply.send(answer);
    }
}

/// Lets the requests that are ready to be read join the batch before its call goes out: yields to the runtime (which
/// then runs every other ready task and polls for I/O) as long as that brings more decisions, up to a few times.
/// No timer, so a lone request waits only one scheduler tick. Under load a call carries more decisions, and Redis
/// spends less per decision in a larger call (its fixed cost is several decisions' worth): with `tollgate bench
/// verify` on a 2-core machine, 7.5–8.3 → 11.5–13.1 decisions per call, and 18–21 → 14–17 µs of script per decision.
async fn gather(pending: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
    for _ in 0..GATHER_YIELDS {
        if batch.len() >= MAX_BATCH {
            return;
        }
        tokio::task::yield_now().await;
        let before = batch.len();
        while batch.len() < MAX_BATCH {
            let Ok(p) = pending.try_recv() else { break };
            batch.push(p);
        }
        if batch.len() == before {
            return;
        }
    }
}

/// The `EVALSHA` of a batch (see limit.lua for the layout), built straight into one command buffer.
fn script_call(script: &redis::Script, prefix: &str, batch: &[Pending]) -> redis::Cmd {
    // Counters and limit kinds repeat within a batch (an organization's counter, a tier's limit): each is sent once,
    // and referred to by its position.
    let mut counters: HashMap<Counted, u16> = HashMap::new();
    let mut keys = Vec::new();
    let mut kinds: Vec<LimitSpec> = Vec::new();
    let mut packed = Vec::with_capacity(batch.len() * 16);
    for p in batch {
        let windows = u8::try_from(p.plan.windows.len()).unwrap_or(u8::MAX);
        packed.extend([windows, u8::from(p.plan.quota.is_some())]);
        packed.extend(p.cost.to_le_bytes());
        let limits = p.plan.windows.iter().take(usize::from(windows));
        let limits = limits.map(|w| (Counted::Window(w.subject, w.seconds), LimitSpec::of(w)));
        let quota = p.plan.quota.iter().map(|q| (Counted::Quota(&q.redis_key), LimitSpec::of_quota(q)));
        for (counter, spec) in limits.chain(quota) {
            let kind = kinds.iter().position(|k| *k == spec).unwrap_or_else(|| {
                kinds.push(spec);
                kinds.len() - 1
            });
            let next = u16::try_from(keys.len() + 1).unwrap_or(u16::MAX);
            let index = *counters.entry(counter).or_insert_with(|| {
                keys.push(counter);
                next
            });
            packed.extend(u16::try_from(kind + 1).unwrap_or(u16::MAX).to_le_bytes());
            packed.extend(index.to_le_bytes());
        }
    }
    let mut call = redis::cmd("EVALSHA");
    call.arg(script.get_hash()).arg(keys.len());
    for counter in &keys {
        match counter {
            Counted::Window(subject, seconds) => call.arg(CounterKey { prefix, subject: *subject, seconds: *seconds }),
            Counted::Quota(key) => call.arg(key),
        };
    }
    call.arg(BUCKETS).arg(batch.len()).arg(kinds.len());
    for kind in &kinds {
        call.arg(kind.limit).arg(kind.bucket_us).arg(u8::from(kind.shadow));
    }
    call.arg(packed);
    call
}

/// A counter a script call reads: a window's (named by its subject and length, see [`CounterKey`]) or a quota's.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Counted<'a> {
    Window(Subject, u32),
    Quota(&'a str),
}

/// What the script needs to know of a limit besides its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LimitSpec {
    limit: u64,
    /// 0 for a monthly quota, which has no buckets.
    bucket_us: i64,
    shadow: bool,
}

impl LimitSpec {
    fn of(w: &WindowLimit) -> LimitSpec {
        LimitSpec { limit: w.limit, bucket_us: Window::seconds(w.seconds).bucket_us, shadow: w.shadow }
    }

    fn of_quota(q: &QuotaLimit) -> LimitSpec {
        LimitSpec { limit: q.limit, bucket_us: 0, shadow: q.shadow }
    }
}

/// Runs a script call, loading the script first if Redis does not have it (a new or flushed server), and unpacks
/// its reply.
async fn run(script: &redis::Script, call: &redis::Cmd, redis: &mut ConnectionManager) -> redis::RedisResult<Vec<i64>> {
    let packed: Vec<u8> = match call.query_async(redis).await {
        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
            script.prepare_invoke().load_async(redis).await?;
            call.query_async(redis).await?
        }
        reply => reply?,
    };
    Ok(unpack(&packed))
}

/// The script's reply: little-endian 8-byte integers (a trailing partial one, which the script never sends, is
/// dropped and caught by the length check).
fn unpack(packed: &[u8]) -> Vec<i64> {
    packed.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
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

/// One window's part of the script's reply.
#[derive(Debug, Clone, Copy)]
struct WindowReply {
    used: u64,
    fits: bool,
    at_us: Option<i64>,
}

/// Reads a decision's part of the script's reply (`reply`: its limits' values on): whether each limit fits follows
/// from its count, the cost and the limit, as the script decided it.
fn interpret(plan: &Plan, cost: u32, now: i64, reply: &[i64]) -> Decision {
    let cost = u64::from(cost);
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    let windows: Vec<WindowReply> = plan
        .windows
        .iter()
        .zip(reply.chunks(2))
        .map(|(w, c)| {
            let used = unsigned(c[0]);
            WindowReply { used, fits: used + cost <= w.limit, at_us: (c[1] >= 0).then_some(c[1]) }
        })
        .collect();
    let quota = plan.quota.as_ref().map(|q| {
        let used = unsigned(reply[2 * plan.windows.len()]);
        (used, used + cost <= q.limit)
    });
    decide_from(plan, cost, now, &windows, quota)
}

/// Turns the per-limit answers into one decision: any enforced limit that does not fit denies (the quota first,
/// then the window that frees up last); otherwise the most restrictive limit is reported.
fn decide_from(plan: &Plan, cost: u64, now: i64, windows: &[WindowReply], quota: Option<(u64, bool)>) -> Decision {
    let window_usage = |w: &WindowLimit, r: &WindowReply, admitted: bool| {
        let geometry = Window::seconds(w.seconds);
        let reset_at_us = match (admitted, r.at_us) {
            (_, Some(at)) => at,
            // Nothing counted before: this request's own bucket is the oldest.
            (true, None) => (now.div_euclid(geometry.bucket_us) + 1) * geometry.bucket_us + geometry.length_us,
            // Its cost exceeds the limit: it never fits; report the window's end.
            (false, None) => now + geometry.length_us,
        };
        let used = if admitted { r.used + cost } else { r.used };
        Usage { kind: w.kind(), limit: w.limit, used, window_seconds: u64::from(w.seconds), reset_at_us, now_us: now }
    };
    let quota_usage = |q: &QuotaLimit, used: u64, admitted: bool| Usage {
        kind: LimitKind::Quota,
        limit: q.limit,
        used: if admitted { used + cost } else { used },
        window_seconds: u64::try_from((q.reset_at_us - now) / 1_000_000).unwrap_or(0),
        reset_at_us: q.reset_at_us,
        now_us: now,
    };

    if let (Some(q), Some((used, false))) = (&plan.quota, quota) {
        if !q.shadow {
            return Decision::Denied { usage: quota_usage(q, used, false), now_us: now };
        }
    }
    let denied = plan
        .windows
        .iter()
        .zip(windows)
        .filter(|(w, r)| !r.fits && !w.shadow)
        .map(|(w, r)| window_usage(w, r, false))
        .max_by_key(|u| u.reset_at_us);
    if let Some(usage) = denied {
        return Decision::Denied { usage, now_us: now };
    }

    let mut shadow = None;
    let mut candidates = Vec::new();
    for (w, r) in plan.windows.iter().zip(windows) {
        if !r.fits {
            shadow = shadow.or(Some(w.kind()));
        } else if !w.shadow {
            candidates.push(window_usage(w, r, true));
        }
    }
    if let (Some(q), Some((used, fits))) = (&plan.quota, quota) {
        if !fits {
            shadow = shadow.or(Some(LimitKind::Quota));
        } else if !q.shadow {
            candidates.push(quota_usage(q, used, true));
        }
    }
    let usage = candidates.into_iter().min_by_key(|u| (u.remaining(), u.window_seconds));
    Decision::Allowed { usage, shadow, now_us: now }
}

/// Consecutive failures open it; after the cooldown one call probes; a success closes it.
struct Breaker {
    state: Mutex<BreakerState>,
    threshold: u32,
    cooldown: Duration,
}

#[derive(Debug, Clone, Copy)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else stays degraded until it returns, or until `until`: a probe whose call
    /// was never made (its request gave up waiting) reports nothing, and another may probe then.
    Probing {
        until: Instant,
    },
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker { state: Mutex::new(BreakerState::Closed { failures: 0 }), threshold: threshold.max(1), cooldown }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is a plain value that is always valid, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closed(&self) -> bool {
        matches!(*self.lock(), BreakerState::Closed { .. })
    }

    /// Whether this call may go to Redis.
    fn permit(&self) -> bool {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::Probing { until } if Instant::now() >= until => {
                *state = BreakerState::Probing { until: Instant::now() + self.cooldown };
                true
            }
            BreakerState::Open { .. } | BreakerState::Probing { .. } => false,
        }
    }

    fn success(&self) {
        let mut state = self.lock();
        if !matches!(*state, BreakerState::Closed { failures: 0 }) {
            if !matches!(*state, BreakerState::Closed { .. }) {
                tracing::info!("rate limiter: Redis answers again; circuit breaker closed");
                metrics::gauge!(RATELIMIT_BREAKER_OPEN).set(0.0);
            }
            *state = BreakerState::Closed { failures: 0 };
        }
    }

    fn failure(&self) {
        let mut state = self.lock();
        let open = match *state {
            BreakerState::Closed { failures } if failures + 1 < self.threshold => {
                *state = BreakerState::Closed { failures: failures + 1 };
                false
            }
            _ => true,
        };
        if open {
            if matches!(*state, BreakerState::Closed { .. }) {
                tracing::warn!(cooldown = ?self.cooldown, "rate limiter: circuit breaker open; Redis is not called");
            }
            metrics::gauge!(RATELIMIT_BREAKER_OPEN).set(1.0);
            *state = BreakerState::Open { until: Instant::now() + self.cooldown };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Uuid = Uuid::from_u128(0x0190a0b0_0000_7000_8000_000000000001);

    fn window(subject: Subject, limit: u64, shadow: bool) -> WindowLimit {
        WindowLimit { subject, limit, seconds: 60, shadow }
    }

    fn reply(used: u64, fits: bool, at_us: Option<i64>) -> WindowReply {
        WindowReply { used, fits, at_us }
    }

    #[test]
    fn the_most_restrictive_limit_is_reported_and_denials_pick_the_latest_retry() {
        let plan = Plan {
            windows: vec![window(Subject::Key(ID), 10, false), window(Subject::Org(ID), 100, false)],
            quota: None,
        };
        let allowed = decide_from(&plan, 1, 0, &[reply(8, true, Some(5)), reply(10, true, Some(7))], None);
        let Decision::Allowed { usage: Some(usage), shadow: None, .. } = allowed else { panic!("{allowed:?}") };
        assert_eq!((usage.kind, usage.used, usage.remaining(), usage.reset_at_us), (LimitKind::Key, 9, 1, 5));
        let denied = decide_from(&plan, 1, 0, &[reply(10, false, Some(5)), reply(100, false, Some(9))], None);
        let Decision::Denied { usage, .. } = denied else { panic!("{denied:?}") };
        assert_eq!((usage.kind, usage.used, usage.reset_at_us), (LimitKind::Org, 100, 9));
    }

    #[test]
    fn shadow_limits_are_reported_but_never_deny_and_the_quota_denies_first() {
        let quota = QuotaLimit { redis_key: "q".into(), limit: 5, reset_at_us: 1_000_000_000, shadow: false };
        let plan = Plan { windows: vec![window(Subject::TierWindow(ID), 10, true)], quota: Some(quota.clone()) };
        let allowed = decide_from(&plan, 1, 0, &[reply(10, false, Some(5))], Some((1, true)));
        let Decision::Allowed { usage: Some(usage), shadow, .. } = allowed else { panic!("{allowed:?}") };
        assert_eq!((usage.kind, usage.used, shadow), (LimitKind::Quota, 2, Some(LimitKind::Tier)));
        let over = decide_from(&plan, 1, 0, &[reply(1, true, None)], Some((5, false)));
        let Decision::Denied { usage, .. } = over else { panic!("{over:?}") };
        assert_eq!((usage.kind, usage.reset_at_us), (LimitKind::Quota, 1_000_000_000));
        let shadow_quota = Plan { quota: Some(QuotaLimit { shadow: true, ..quota }), ..plan };
        let allowed = decide_from(&shadow_quota, 1, 0, &[reply(1, true, None)], Some((5, false)));
        assert!(matches!(allowed, Decision::Allowed { shadow: Some(LimitKind::Quota), .. }), "{allowed:?}");
    }

    #[test]
    fn the_breaker_opens_probes_once_and_closes() {
        let breaker = Breaker::new(2, Duration::from_millis(30));
        assert!(breaker.permit());
        breaker.failure();
        assert!(breaker.is_closed());
        breaker.failure();
        assert!(!breaker.permit());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.permit(), "one probe after the cooldown");
        assert!(!breaker.permit(), "only one");
        breaker.failure();
        assert!(!breaker.permit());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.permit(), "a probe that never reports");
        assert!(!breaker.permit());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.permit(), "lets another probe after the cooldown");
        breaker.success();
        assert!(breaker.is_closed() && breaker.permit());
    }

    #[test]
    fn counters_are_named_by_subject_and_window_length() {
        let ip = IpAddr::from([192, 0, 2, 7]);
        let names: Vec<String> =
            [Subject::Key(ID), Subject::TierWindow(ID), Subject::TierBurst(ID), Subject::Org(ID), Subject::Ip(ip)]
                .into_iter()
                .map(|subject| CounterKey { prefix: "tg:", subject, seconds: 60 }.to_string())
                .collect();
        let id = "0190a0b0-0000-7000-8000-000000000001";
        let expected = [
            format!("tg:window:key:{id}:60"),
            format!("tg:window:tierw:{id}:60"),
            format!("tg:window:tierb:{id}:60"),
            format!("tg:window:org:{id}:60"),
            "tg:window:ip:192.0.2.7:60".to_owned(),
        ];
        assert_eq!(names, expected);
        // An IPv4 client seen through an IPv6 socket is the same client.
        let mapped = Plan::for_ip_failures("::ffff:192.0.2.7".parse().expect("ip"), 10);
        let mapped = &mapped.windows[0];
        assert_eq!(
            CounterKey { prefix: "tg:", subject: mapped.subject, seconds: mapped.seconds }.to_string(),
            expected[4]
        );
    }

    #[test]
    fn a_script_call_sends_each_counter_and_limit_kind_once() {
        let quota = QuotaLimit { redis_key: "tg:quota:o".into(), limit: 50, reset_at_us: 0, shadow: false };
        let plan = |key: u128| {
            let key = Uuid::from_u128(key);
            Arc::new(Plan {
                windows: vec![window(Subject::Key(key), 10, false), window(Subject::Org(ID), 100, true)],
                quota: Some(quota.clone()),
            })
        };
        let batch: Vec<Pending> = [(plan(1), 1), (plan(2), 300), (plan(1), 2)]
            .into_iter()
            .map(|(plan, cost)| Pending { plan, cost, since: Instant::now(), reply: oneshot::channel().0 })
            .collect();
        let script = redis::Script::new("return 1");
        let call = script_call(&script, "tg:", &batch);
        let args: Vec<Vec<u8>> = call
            .args_iter()
            .filter_map(|arg| match arg {
                redis::Arg::Simple(bytes) => Some(bytes.to_vec()),
                redis::Arg::Cursor => None,
            })
            .collect();
        let text = |arg: &[u8]| String::from_utf8_lossy(arg).into_owned();
        // EVALSHA, sha, then 4 counters: key 1's, the organization's, the quota's, key 2's.
        assert_eq!(text(&args[2]), "4");
        let key = |n: u128| CounterKey { prefix: "tg:", subject: Subject::Key(Uuid::from_u128(n)), seconds: 60 };
        let org = CounterKey { prefix: "tg:", subject: Subject::Org(ID), seconds: 60 }.to_string();
        assert_eq!(
            args[3..7].iter().map(|a| text(a)).collect::<Vec<_>>(),
            [&key(1).to_string(), &org, "tg:quota:o", &key(2).to_string()]
        );
        // Buckets, 3 decisions, 3 kinds (limit, bucket, shadow each).
        let bucket_us = (60_000_000 / BUCKETS).to_string();
        let kinds = ["100", "3", "3", "10", &bucket_us, "0", "100", &bucket_us, "1", "50", "0", "0"];
        assert_eq!(args[7..19].iter().map(|a| text(a)).collect::<Vec<_>>(), kinds);
        // Per decision: 2 windows, a quota, its cost, then (kind, counter) per limit.
        let decision = |cost: u32, key: u16| {
            let mut bytes = vec![2, 1];
            bytes.extend(cost.to_le_bytes());
            for (kind, counter) in [(1u16, key), (2, 2), (3, 3)] {
                bytes.extend(kind.to_le_bytes());
                bytes.extend(counter.to_le_bytes());
            }
            bytes
        };
        assert_eq!(args[19], [decision(1, 1), decision(300, 4), decision(2, 1)].concat());
        assert_eq!(args.len(), 20);
    }

    fn pending(cost: u32) -> Pending {
        Pending { plan: Arc::new(Plan::default()), cost, since: Instant::now(), reply: oneshot::channel().0 }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_waits_for_the_decisions_of_tasks_already_ready_and_no_longer() {
        let (calls, mut queue) = mpsc::channel(MAX_BATCH * 2);
        calls.try_send(pending(1)).expect("room");
        // Ready tasks that each queue a decision, one of them only after another yield of its own.
        for cost in [2, 3] {
            let calls = calls.clone();
            tokio::spawn(async move { calls.try_send(pending(cost)).expect("room") });
        }
        let later = calls.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            later.try_send(pending(4)).expect("room");
        });
        let mut batch = Vec::new();
        queue.recv_many(&mut batch, MAX_BATCH).await;
        gather(&mut queue, &mut batch).await;
        assert_eq!(batch.iter().map(|p| p.cost).collect::<Vec<_>>(), [1, 2, 3, 4]);

        // Nothing else ready: one tick, and the call goes out with what it has.
        calls.try_send(pending(5)).expect("room");
        let mut batch = Vec::new();
        queue.recv_many(&mut batch, MAX_BATCH).await;
        gather(&mut queue, &mut batch).await;
        assert_eq!(batch.len(), 1);

        // A batch never grows past its bound; the rest waits for the next call.
        for cost in 0..MAX_BATCH as u32 + 1 {
            calls.try_send(pending(cost)).expect("room");
        }
        let mut batch = Vec::new();
        queue.recv_many(&mut batch, MAX_BATCH).await;
        gather(&mut queue, &mut batch).await;
        assert_eq!((batch.len(), queue.len()), (MAX_BATCH, 1));
    }

    #[test]
    fn the_packed_reply_unpacks_to_signed_integers() {
        let packed: Vec<u8> = [1_764_000_000_000_000_i64, -1, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(unpack(&packed), vec![1_764_000_000_000_000, -1, 0]);
        assert_eq!(unpack(&packed[..20]), vec![1_764_000_000_000_000, -1]);
    }

    #[test]
    fn quota_keys_name_the_utc_month() {
        let at = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).single().expect("time");
        assert_eq!(quota_key("tg:", ID, at), "tg:quota:0190a0b0-0000-7000-8000-000000000001:2026-12");
        assert_eq!(next_month(at), Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).single().expect("time"));
    }
}
