//! Keeping the Redis monthly quota counters (see `tollgate_shared::quota_counter` for the contract) equal to the
//! units committed in PostgreSQL.
//!
//! After each commit a worker *raises* each touched counter to the total PostgreSQL returned in that commit, with
//! a "set if greater" script: concurrent workers, replays and late retries can never move a counter backwards, a
//! counter lost in a Redis flush or restart is rebuilt by the next batch of that organization, and a counter is
//! never ahead of PostgreSQL (it only ever holds values PostgreSQL has committed). Redis being away or hung does not
//! hold up the batch, nor a worker's start: a [`CounterRaiser`] raises the counters in a task of its own, keeping
//! the newest totals until Redis takes them (PostgreSQL is the truth; `tollgate usage reconcile` repairs too).

use std::collections::HashMap;
use std::time::Duration;

use chrono::NaiveDate;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use uuid::Uuid;

use tollgate_shared::metrics::QUOTA_COUNTER_ERRORS;

use tollgate_shared::connect::BackgroundRedis;
use tollgate_shared::quota_counter;

use crate::store::PeriodTotal;

/// Counters outlive their month by a little, then go (a month is never longer than 31 days, so an active counter
/// cannot expire mid-month: every raise refreshes the expiry).
const COUNTER_TTL_SECONDS: u64 = 40 * 24 * 3600;

/// KEYS: counters; ARGV: the new totals in the same order, then the TTL. Raises each counter that is below its
/// new total, or missing, or holding what is not a number (another writer's value, even of another type: written
/// over, rather than failing the raise of every counter with it for good).
const RAISE: &str = r"
local ttl = ARGV[#KEYS + 1]
for i, key in ipairs(KEYS) do
    local new = tonumber(ARGV[i])
    local stored = redis.pcall('GET', key)
    local current = type(stored) == 'string' and tonumber(stored) or -1
    if new > current then
        redis.call('SET', key, ARGV[i], 'EX', ttl)
    end
end
return 0";

/// KEYS[1]: a counter; ARGV: the value observed ('' when missing or not a string), the value to set, the TTL. Sets
/// it only if it still holds the observed value, so a repair never overwrites a newer total a worker wrote meanwhile.
const REPLACE_IF: &str = r"
local stored = redis.pcall('GET', KEYS[1])
local current = type(stored) == 'string' and stored or ''
if current == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
    return 1
end
return 0";

/// The quota counters of one deployment (one Redis prefix).
#[derive(Clone)]
pub struct QuotaCounters {
    redis: BackgroundRedis,
    prefix: String,
    raise: redis::Script,
    replace_if: redis::Script,
}

impl QuotaCounters {
    /// Counters under `prefix` (the deployment's `TOLLGATE_REDIS_PREFIX`).
    pub fn new(redis: impl Into<BackgroundRedis>, prefix: impl Into<String>) -> QuotaCounters {
        QuotaCounters {
            redis: redis.into(),
            prefix: prefix.into(),
            raise: redis::Script::new(RAISE),
            replace_if: redis::Script::new(REPLACE_IF),
        }
    }

    /// The connection, or an error until it is made (the worker started while Redis was away).
    fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        self.redis.get().ok_or_else(|| (redis::ErrorKind::IoError, "not connected to Redis yet").into())
    }

    /// The Redis key of `total`'s organization and month.
    pub fn key(&self, total: &PeriodTotal) -> String {
        quota_counter::key(&self.prefix, total.org_id, total.month)
    }

    /// Raises each counter to its committed total, in one round trip.
    pub async fn raise(&mut self, totals: &[PeriodTotal]) -> redis::RedisResult<()> {
        if totals.is_empty() {
            return Ok(());
        }
        let mut invocation = self.raise.prepare_invoke();
        for total in totals {
            invocation.key(self.key(total)).arg(total.units);
        }
        invocation.arg(COUNTER_TTL_SECONDS);
        let _: i64 = invocation.invoke_async(&mut self.connection()?).await?;
        Ok(())
    }

    /// The counters as stored (None when missing or not a string), in the order given: as bytes, since a counter
    /// holding what is not a number (not even text) is one to repair, not a reason to fail.
    pub async fn read(&mut self, totals: &[PeriodTotal]) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        if totals.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = totals.iter().map(|t| self.key(t)).collect();
        redis::cmd("MGET").arg(keys).query_async(&mut self.connection()?).await
    }

    /// Sets the counter to `total.units` if it still holds `observed` (as [`QuotaCounters::read`] gave it); true if
    /// it did.
    pub async fn replace_if(&mut self, total: &PeriodTotal, observed: Option<&[u8]>) -> redis::RedisResult<bool> {
        let observed = observed.unwrap_or_default();
        let replaced: i64 = self
            .replace_if
            .key(self.key(total))
            .arg(observed)
            .arg(total.units)
            .arg(COUNTER_TTL_SECONDS)
            .invoke_async(&mut self.connection()?)
            .await?;
        Ok(replaced == 1)
    }
}

/// First and longest wait before raising again after Redis failed. The longest is short: when Redis comes back
/// empty (a restart), each counter reads 0 until it is raised, so every moment the raiser sleeps past that lets an
/// organization over its quota through (the quota may overshoot by at most a second of its traffic).
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(250);
/// Longest a stopping worker waits for the counters it still holds to be raised.
const FINISH_WAIT: Duration = Duration::from_secs(2);

/// Hands each commit's totals to a task that raises the counters, so that a slow or hung Redis (each call may wait
/// out the connection's response timeout) never holds up a batch. The task keeps the highest total per counter
/// until Redis takes them.
pub struct CounterRaiser {
    commits: mpsc::UnboundedSender<Vec<PeriodTotal>>,
    /// Aborted if the raiser is dropped without [`CounterRaiser::finish`] (its worker's future was dropped).
    task: AbortOnDropHandle<()>,
}

impl CounterRaiser {
    pub fn spawn(quota: QuotaCounters) -> CounterRaiser {
        let (commits, totals) = mpsc::unbounded_channel();
        let task = AbortOnDropHandle::new(tokio::spawn(raise_counters(totals, quota).in_current_span()));
        CounterRaiser { commits, task }
    }

    /// The totals of one commit, to raise the counters to.
    pub fn raise(&self, totals: Vec<PeriodTotal>) {
        if !totals.is_empty() {
            // The task ends only after `finish`, which takes `self`.
            let _ = self.commits.send(totals);
        }
    }

    /// Raises what is still held, waiting at most `FINISH_WAIT` for Redis.
    pub async fn finish(self) {
        let CounterRaiser { commits, mut task } = self;
        drop(commits);
        if tokio::time::timeout(FINISH_WAIT, &mut task).await.is_err() {
            task.abort();
            tracing::warn!("stopped before Redis took the latest quota totals; the next batches repair the counters");
        }
    }
}

/// Keeps the highest total of each counter.
fn take(pending: &mut HashMap<(Uuid, NaiveDate), i64>, totals: Vec<PeriodTotal>) {
    for total in totals {
        let units = pending.entry((total.org_id, total.month)).or_insert(total.units);
        *units = (*units).max(total.units);
    }
}

async fn raise_counters(mut commits: mpsc::UnboundedReceiver<Vec<PeriodTotal>>, mut quota: QuotaCounters) {
    let mut pending = HashMap::new();
    let (mut failing, mut delay) = (false, RETRY_FIRST);
    loop {
        if pending.is_empty() {
            match commits.recv().await {
                Some(totals) => take(&mut pending, totals),
                None => return,
            }
        }
        // What came in meanwhile (many commits while Redis was slow) goes in the same call.
        while let Ok(totals) = commits.try_recv() {
            take(&mut pending, totals);
        }
        let totals: Vec<PeriodTotal> =
            pending.iter().map(|(&(org_id, month), &units)| PeriodTotal { org_id, month, units }).collect();
        match quota.raise(&totals).await {
            Ok(()) => {
                pending.clear();
                if std::mem::take(&mut failing) {
                    tracing::info!("the Redis quota counters are updated again");
                }
                delay = RETRY_FIRST;
            }
            Err(e) => {
                metrics::counter!(QUOTA_COUNTER_ERRORS).increment(1);
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "cannot update the Redis quota counters; retrying until Redis answers");
                }
                if commits.is_closed() {
                    // The worker is stopping: the next batch of each organization repairs its counter.
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}
