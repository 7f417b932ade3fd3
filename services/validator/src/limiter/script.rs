//! The script calls: the decisions that concurrent requests queue go to Redis together, up to [`MAX_BATCH`] in one
//! `EVALSHA` of limit.lua and [`CALLS_IN_FLIGHT`] calls at a time, and each decision reads its own part of the
//! reply.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, Semaphore};

use tollgate_shared::connect::BackgroundRedis;

use super::breaker::Breaker;
use super::clock::RedisClock;
use super::plan::{Plan, QuotaLimit, Subject, WindowLimit};
use super::verdict::{decide_from, WindowReply};
use super::window::{Window, BUCKETS};
use super::Decision;

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
/// Scheduler ticks a script call waits at most for more decisions to join it (see [`gather`]).
const GATHER_YIELDS: usize = 8;
/// Decisions waiting for a call at most: past that, a decision follows its failure policy at once (overloaded) rather
/// than wait out its timeout in the queue.
const QUEUED_AT_MOST: usize = 1024;

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

/// The queue to the task that makes the script calls.
pub struct Calls {
    queue: mpsc::Sender<Pending>,
}

impl Calls {
    /// Starts the task that makes the script calls; must be called within the Tokio runtime. `prefix` begins the
    /// name of every counter (see [`CounterKey`]).
    /// Each reply sets `clock`.
    pub fn start(
        redis: BackgroundRedis,
        timeout: Duration,
        prefix: &str,
        breaker: Arc<Breaker>,
        clock: Arc<RedisClock>,
    ) -> Calls {
        let (queue, pending) = mpsc::channel(QUEUED_AT_MOST);
        tokio::spawn(make_calls(pending, redis, timeout, prefix.to_owned(), breaker, clock));
        Calls { queue }
    }

    /// Queues a decision for the next script call. The task making the calls answers it within the timeout (see
    /// [`make_calls`]): one deadline per call rather than a timer per request.
    pub async fn call(&self, plan: Arc<Plan>, cost: u32, since: Instant) -> Result<Reply, CallError> {
        let (reply, answer) = oneshot::channel();
        self.queue.try_send(Pending { plan, cost, since, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CallError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => CallError::Stopped,
        })?;
        answer.await.map_err(|_| CallError::Stopped)?
    }
}

/// Why the Redis call did not decide.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
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
    pub const LABELS: [&'static str; 2] = ["timeout", "error"];

    /// Its `kind` label on the Redis errors counter.
    pub fn label(&self) -> &'static str {
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
pub struct Reply {
    values: Arc<Vec<i64>>,
    at: usize,
}

impl Reply {
    /// The decision its part of the reply gives (`reply`: its limits' values on): whether each limit fits follows
    /// from its count, the cost and the limit, as the script decided it.
    pub fn interpret(&self, plan: &Plan, cost: u32) -> Decision {
        let (now, reply) = (self.values[0], &self.values[self.at..]);
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
}

/// Makes script calls, up to [`CALLS_IN_FLIGHT`] at a time: each decides the decisions queued since the previous one
/// went out, [`MAX_BATCH`] at most. Redis runs the calls one after another, each atomically, so that a call's decisions
/// see the counts of every call it ran after. Every decision is answered within `timeout` of when it was queued: one
/// that waited that long in the queue is answered at once, and the others as their own deadlines pass, if Redis has
/// not answered by then.
async fn make_calls(
    mut pending: mpsc::Receiver<Pending>,
    redis: BackgroundRedis,
    timeout: Duration,
    prefix: String,
    breaker: Arc<Breaker>,
    clock: Arc<RedisClock>,
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
        let clock = clock.clone();
        tokio::spawn(async move {
            decide_batch(script, &prefix, redis, batch, timeout, breaker, &clock).await;
            drop(slot);
        });
    }
}

/// Decides a batch in one script call and answers each of its decisions, by its own deadline at the latest.
async fn decide_batch(
    script: Arc<redis::Script>,
    prefix: &str,
    redis: Option<ConnectionManager>,
    mut batch: Vec<Pending>,
    timeout: Duration,
    breaker: Arc<Breaker>,
    clock: &RedisClock,
) {
    let now = Instant::now();
    for late in batch.extract_if(.., |p| now >= p.since + timeout) {
        let _ = late.reply.send(Err(CallError::Timeout));
    }
    // Requests that gave up waiting need no decision: deciding them would count units nobody was granted.
    batch.retain(|p| !p.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let Some(redis) = redis else {
        tracing::warn!("rate limiter: not connected to Redis yet; decisions follow the failure policy");
        breaker.failure();
        for p in batch {
            let _ = p.reply.send(Err(CallError::NotConnected));
        }
        return;
    };
    let call = script_call(&script, prefix, &batch);
    let expected = 1 + batch.iter().map(|p| p.plan.reply_len()).sum::<usize>();
    // Each decision with where its values start in the reply (after the clock).
    let mut waiting: Vec<(usize, Pending)> = batch
        .into_iter()
        .scan(1, |at, p| {
            let start = *at;
            *at += p.plan.reply_len();
            Some((start, p))
        })
        .collect();
    let deadline = Instant::now() + timeout;
    let mut reply = Box::pin(call_redis(script, call, redis, expected, deadline, breaker));
    loop {
        // A decision that waited for the call is answered when its own deadline passes, not all of them at the
        // oldest one's: that one could leave the others (and Redis) a millisecond.
        let Some(first) = waiting.iter().map(|(_, p)| p.since).min() else {
            // Every decision is answered: the call goes on by itself, until it can tell the breaker how it went.
            tokio::spawn(reply);
            return;
        };
        match tokio::time::timeout_at((first + timeout).into(), reply.as_mut()).await {
            Err(_) => {
                let now = Instant::now();
                for (_, late) in waiting.extract_if(.., |(_, p)| now >= p.since + timeout) {
                    let _ = late.reply.send(Err(CallError::Timeout));
                }
            }
            Ok(reply) => {
                if let Ok(values) = &reply {
                    clock.observe(values[0]);
                }
                for (at, p) in waiting {
                    let answer =
                        reply.as_ref().map(|values| Reply { values: values.clone(), at }).map_err(Clone::clone);
                    // A requester that timed out meanwhile is gone; nothing to tell it.
                    let _ = p.reply.send(answer);
                }
                return;
            }
        }
    }
}

/// Makes one script call, and tells the breaker how it went: whether Redis answered by `deadline` (the timeout from
/// when the call went out), also when its decisions, having waited in the queue, were answered before. One slow call
/// is one failure, however many requests it carried (counted per decision, a single call that timed out opened the
/// breaker and sent a whole cooldown of traffic to the failure policies).
async fn call_redis(
    script: Arc<redis::Script>,
    call: redis::Cmd,
    mut redis: ConnectionManager,
    expected: usize,
    deadline: Instant,
    breaker: Arc<Breaker>,
) -> Result<Arc<Vec<i64>>, CallError> {
    let reply = match tokio::time::timeout_at(deadline.into(), run(&script, &call, &mut redis)).await {
        Err(_) => Err(CallError::Timeout),
        Ok(Err(e)) => Err(CallError::Redis(Arc::new(e))),
        Ok(Ok(values)) if values.len() != expected => Err(CallError::Reply(values.len())),
        Ok(Ok(values)) => Ok(Arc::new(values)),
    };
    match &reply {
        Ok(_) => breaker.success(),
        Err(e) => {
            tracing::warn!(error = %e, "rate limiter: a Redis call failed; its decisions follow the failure policy");
            breaker.failure();
        }
    }
    reply
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use uuid::Uuid;

    use super::*;

    const ID: Uuid = Uuid::from_u128(0x0190a0b0_0000_7000_8000_000000000001);

    fn window(subject: Subject, limit: u64, shadow: bool) -> WindowLimit {
        WindowLimit { subject, limit, seconds: 60, shadow }
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
    }

    #[test]
    fn a_script_call_sends_each_counter_and_limit_kind_once() {
        let quota = QuotaLimit {
            redis_key: "tg:quota:o".into(),
            limit: 50,
            reset_at_us: 0,
            window_seconds: 2_592_000,
            shadow: false,
        };
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
}
