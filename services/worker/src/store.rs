//! Writing a batch of usage events to PostgreSQL exactly once.
//!
//! One transaction per batch. The rows go by binary `COPY` straight into `api_usage`: a batch nobody has written
//! before (nearly all of them) costs PostgreSQL no more than a plain COPY. An event that is already there (a
//! re-delivery) makes the COPY fail on the event id's unique index; the batch then starts over the careful way:
//! COPY into a session-local staging table and one `INSERT … ON CONFLICT DO NOTHING RETURNING event_id`, which says
//! which rows were new. Either way, the rows actually inserted are summed here, and one statement adds the sums to
//! `usage_hourly`, `billing_periods` and the keys' `last_used_at`/`total_requests` (one row per group, not per
//! event), returning the new monthly totals of the organizations it billed, for the Redis quota counters. A
//! re-delivered event inserts nothing, so it changes nothing downstream either.
//!
//! Lock order: the rollup and billing upserts take their rows sorted by primary key, so concurrent workers touching
//! the same hours and organizations queue behind each other instead of deadlocking (the keys' update follows the
//! join's order, which PostgreSQL chooses); a deadlock or serialization failure that still happens is retried at
//! once (a few times) before the error reaches the worker's backoff loop.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, DurationRound, Months, NaiveDate, NaiveTime, TimeDelta, Utc};
use sqlx::{Executor, PgPool, Postgres, Transaction};
use uuid::Uuid;

use tollgate_shared::domain::Outcome;
use tollgate_shared::event::UsageEvent;

use crate::copy::CopyEncoder;
use crate::user_agents::UserAgents;

/// Encodes one column of a usage row for binary COPY (the user agent as its id).
type Encode = fn(&UsageEvent, &UserAgents, &mut CopyEncoder);

/// The columns a worker writes to `api_usage`, in order, with their encoders: the only list of them (the COPY,
/// the staging table's use and the insert are all derived from it), so adding a column is one line here.
const USAGE_COLUMNS: &[(&str, Encode)] = &[
    ("event_id", |e, _, c| c.uuid(e.event_id)),
    ("ts", |e, _, c| c.timestamptz(e.ts)),
    ("org_id", |e, _, c| c.uuid(e.org_id)),
    ("key_id", |e, _, c| c.uuid(e.key_id)),
    ("units", |e, _, c| c.int4(clamp(e.units))),
    ("latency_us", |e, _, c| c.int4(clamp(e.latency_us))),
    ("outcome", |e, _, c| c.text(e.outcome.as_str())),
    ("method", |e, _, c| c.text(&e.method)),
    ("path", |e, _, c| c.text(&e.path)),
    ("client_ip", |e, _, c| c.inet_opt(e.client_ip)),
    ("user_agent_id", |e, agents, c| c.int4_opt(agents.id(e.user_agent.as_deref()))),
    ("request_id", |e, _, c| c.text_opt(e.request_id.as_deref())),
    ("shadow_outcome", |e, _, c| c.text_opt(e.shadow_outcome.map(|o| o.as_str()))),
];

fn clamp(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A staging table per session: `LIKE api_usage` follows the schema, and `ON COMMIT DELETE ROWS` empties it at
/// every commit. `client_min_messages` hides the "already exists" notice the second time round.
const CREATE_STAGING: &str = "SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS usage_staging (LIKE api_usage INCLUDING DEFAULTS) ON COMMIT DELETE ROWS";

/// `{columns}` is replaced by [`USAGE_COLUMNS`]' names.
const MOVE_STAGED: &str = "INSERT INTO api_usage ({columns})
SELECT {columns} FROM usage_staging ORDER BY event_id
ON CONFLICT DO NOTHING
RETURNING event_id";

/// Adds a batch's sums (arrays sorted by each table's key) to the rollups and billing; returns the new monthly
/// totals of the organizations billed.
const ROLL_UP: &str = "
WITH hourly AS (
    INSERT INTO usage_hourly AS h (org_id, hour, key_id, allowed, denied, units)
    SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[], $4::int8[], $5::int8[], $6::int8[])
    ON CONFLICT (org_id, hour, key_id) DO UPDATE
        SET allowed = h.allowed + EXCLUDED.allowed,
            denied = h.denied + EXCLUDED.denied,
            units = h.units + EXCLUDED.units
), key_use AS (
    UPDATE api_keys k
       SET last_used_at = GREATEST(k.last_used_at, u.last_ts), total_requests = k.total_requests + u.n
      FROM unnest($7::uuid[], $8::timestamptz[], $9::int8[]) AS u (key_id, last_ts, n)
     WHERE k.id = u.key_id
)
INSERT INTO billing_periods AS b (org_id, month, plan, requests, units, included_units, price_per_thousand_minor,
                                  currency)
SELECT a.org_id, a.month, coalesce(o.plan, 'free'), a.requests, a.units, coalesce(p.included_units, 0),
       coalesce(p.price_per_thousand_minor, 0), coalesce(p.currency, 'USD')
FROM unnest($10::uuid[], $11::date[], $12::int8[], $13::int8[]) WITH ORDINALITY AS a (org_id, month, requests, units, n)
LEFT JOIN organizations o ON o.id = a.org_id
LEFT JOIN plans p ON p.name = coalesce(o.plan, 'free')
ORDER BY a.n
ON CONFLICT (org_id, month) DO UPDATE
    SET requests = b.requests + EXCLUDED.requests,
        units = b.units + EXCLUDED.units,
        updated_at = now()
RETURNING org_id, month, units";

/// The committed monthly totals of some (organization, month) pairs.
const PERIOD_TOTALS: &str = "
SELECT b.org_id, b.month, b.units
FROM billing_periods b JOIN unnest($1::uuid[], $2::date[]) AS a (org_id, month) USING (org_id, month)";

/// How long after a failed attempt at next month's partition the next one is made.
const AHEAD_RETRY: Duration = Duration::from_secs(60);

/// Immediate retries of a batch that lost a deadlock or a serialization conflict.
const CONFLICT_RETRIES: usize = 3;

/// Writes usage batches; remembers which monthly partitions exist so it only asks once per month.
pub struct UsageStore {
    pool: PgPool,
    /// First days of the months whose partition exists.
    partitions: HashSet<NaiveDate>,
    /// No attempt at a partition ahead before this, after one failed.
    ahead_not_before: Option<Instant>,
    copy_statement: String,
    staging_copy_statement: String,
    move_statement: String,
    user_agents: UserAgents,
}

/// An organization's committed allowed units for one month, after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodTotal {
    pub org_id: Uuid,
    /// First day of the month (UTC).
    pub month: NaiveDate,
    pub units: i64,
}

/// What a batch did: rows inserted, events that were already there (re-deliveries), and the new monthly totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub inserted: u64,
    pub duplicates: u64,
    pub totals: Vec<PeriodTotal>,
}

impl UsageStore {
    /// A store writing through `pool`.
    pub fn new(pool: PgPool) -> UsageStore {
        UsageStore {
            pool,
            partitions: HashSet::new(),
            ahead_not_before: None,
            copy_statement: copy_statement("api_usage"),
            staging_copy_statement: copy_statement("usage_staging"),
            move_statement: MOVE_STAGED.replace("{columns}", &column_list()),
            user_agents: UserAgents::default(),
        }
    }

    /// Writes `events` in one transaction. Events repeated within the batch are written once (and counted as
    /// duplicates, as are those written before: every event offered is inserted or a duplicate).
    pub async fn write(&mut self, events: &[UsageEvent]) -> Result<Written, sqlx::Error> {
        let offered = events.len() as u64;
        let mut seen = HashSet::with_capacity(events.len());
        let events: Vec<&UsageEvent> = events.iter().filter(|e| seen.insert(e.event_id)).collect();
        if events.is_empty() {
            return Ok(Written::default());
        }
        self.ensure_partitions(&events).await?;
        self.user_agents.resolve(&self.pool, &events).await?;
        let rows = bytes::Bytes::from(encode(&events, &self.user_agents));
        let mut attempt = 0;
        loop {
            match self.write_once(&events, rows.clone()).await {
                Err(e) if is_conflict(&e) && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "batch lost a lock conflict; retrying at once");
                }
                Err(e) => {
                    // The partitions remembered may be gone (detached or dropped by an operator, or by retention):
                    // the retry asks for them again (making a dropped one again, attaching a detached one again)
                    // rather than failing on a missing one for ever.
                    self.partitions.clear();
                    return Err(e);
                }
                Ok((inserted, totals)) => {
                    return Ok(Written { inserted, duplicates: offered - inserted, totals });
                }
            }
        }
    }

    async fn write_once(
        &self,
        events: &[&UsageEvent],
        rows: bytes::Bytes,
    ) -> Result<(u64, Vec<PeriodTotal>), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let inserted: Vec<&UsageEvent> = match copy_in(&mut tx, &self.copy_statement, rows.clone()).await {
            Ok(()) => events.to_vec(),
            Err(e) if is_duplicate(&e) => {
                tx.rollback().await?;
                tx = self.pool.begin().await?;
                let new = self.insert_new(&mut tx, rows).await?;
                events.iter().copied().filter(|e| new.contains(&e.event_id)).collect()
            }
            Err(e) => return Err(e),
        };
        let mut totals = roll_up(&mut tx, &inserted).await?;
        if inserted.len() < events.len() {
            // Events written before: a batch retried after its commit (a lost reply, or a failure after it), whose
            // quota counters may never have been raised. Raising them to what is committed is harmless if they were.
            totals = period_totals(&mut tx, events).await?;
        }
        tx.commit().await?;
        Ok((inserted.len() as u64, totals))
    }

    /// Inserts the rows whose event is not there yet; returns their event ids.
    async fn insert_new(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        rows: bytes::Bytes,
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        // A plain string without arguments goes by the simple query protocol, which allows two statements.
        (&mut **tx).execute(CREATE_STAGING).await?;
        copy_in(tx, &self.staging_copy_statement, rows).await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(&self.move_statement).fetch_all(&mut **tx).await?;
        Ok(ids.into_iter().collect())
    }

    /// Makes sure the partitions of the events' months exist, and of the month after each, so that a month's
    /// partition is there before its first event: one that cannot be made ahead now is tried again a minute later.
    /// An event of a past month (replayed late from a spool or the dead letters) makes its own month's only: the next
    /// may have been detached for archiving.
    async fn ensure_partitions(&mut self, events: &[&UsageEvent]) -> Result<(), sqlx::Error> {
        let months: BTreeSet<NaiveDate> = events.iter().map(|e| month_of(e.ts)).collect();
        let current = month_of(chrono::Utc::now());
        for month in months {
            self.ensure_partition(month).await?;
            if month < current {
                continue;
            }
            let next = month + Months::new(1);
            // A failed attempt waited out the function's lock timeout: not again with every batch.
            if self.partitions.contains(&next) || self.ahead_not_before.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            if let Err(e) = self.ensure_partition(next).await {
                tracing::warn!(error = %e, %next, "cannot create next month's usage partition yet; trying again in a minute");
                self.ahead_not_before = Some(Instant::now() + AHEAD_RETRY);
            }
        }
        Ok(())
    }

    async fn ensure_partition(&mut self, month: NaiveDate) -> Result<(), sqlx::Error> {
        if !self.partitions.contains(&month) {
            let first_day = month.and_time(NaiveTime::MIN).and_utc();
            sqlx::query("SELECT tollgate_ensure_usage_partition($1)").bind(first_day).execute(&self.pool).await?;
            self.partitions.insert(month);
        }
        Ok(())
    }
}

async fn copy_in(tx: &mut Transaction<'_, Postgres>, statement: &str, rows: bytes::Bytes) -> Result<(), sqlx::Error> {
    let mut copy = tx.copy_in_raw(statement).await?;
    copy.send(rows).await?;
    copy.finish().await?;
    Ok(())
}

/// The committed monthly totals of the organizations and months `events` bill.
async fn period_totals(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&UsageEvent],
) -> Result<Vec<PeriodTotal>, sqlx::Error> {
    let billed = Sums::of(events).billing;
    if billed.is_empty() {
        return Ok(Vec::new());
    }
    let totals: Vec<(Uuid, NaiveDate, i64)> = sqlx::query_as(PERIOD_TOTALS)
        .bind(column(&billed, |(org, _), _| *org))
        .bind(column(&billed, |(_, month), _| *month))
        .fetch_all(&mut **tx)
        .await?;
    Ok(totals.into_iter().map(|(org_id, month, units)| PeriodTotal { org_id, month, units }).collect())
}

/// Adds the inserted events to `usage_hourly`, `billing_periods` and the keys' usage; returns the new monthly totals.
async fn roll_up(
    tx: &mut Transaction<'_, Postgres>,
    inserted: &[&UsageEvent],
) -> Result<Vec<PeriodTotal>, sqlx::Error> {
    if inserted.is_empty() {
        return Ok(Vec::new());
    }
    let Sums { hourly, keys, billing } = Sums::of(inserted);
    let totals: Vec<(Uuid, NaiveDate, i64)> = sqlx::query_as(ROLL_UP)
        .bind(column(&hourly, |(org, _, _), _| *org))
        .bind(column(&hourly, |(_, hour, _), _| *hour))
        .bind(column(&hourly, |(_, _, key), _| *key))
        .bind(column(&hourly, |_, (allowed, _, _)| *allowed))
        .bind(column(&hourly, |_, (_, denied, _)| *denied))
        .bind(column(&hourly, |_, (_, _, units)| *units))
        .bind(column(&keys, |key, _| *key))
        .bind(column(&keys, |_, (last, _)| *last))
        .bind(column(&keys, |_, (_, n)| *n))
        .bind(column(&billing, |(org, _), _| *org))
        .bind(column(&billing, |(_, month), _| *month))
        .bind(column(&billing, |_, (requests, _)| *requests))
        .bind(column(&billing, |_, (_, units)| *units))
        .fetch_all(&mut **tx)
        .await?;
    Ok(totals.into_iter().map(|(org_id, month, units)| PeriodTotal { org_id, month, units }).collect())
}

/// A `usage_hourly` row's key: (org, hour, key).
type HourKey = (Uuid, DateTime<Utc>, Uuid);
/// What a batch adds to a `usage_hourly` row: (allowed, denied, allowed units).
type HourSums = (i64, i64, i64);

/// A batch's inserted events summed per row of each table they count in, sorted by that table's key.
#[derive(Debug, Default, PartialEq)]
struct Sums {
    hourly: BTreeMap<HourKey, HourSums>,
    /// key → (last use, requests).
    keys: BTreeMap<Uuid, (DateTime<Utc>, i64)>,
    /// (org, month) → (allowed requests, allowed units).
    billing: BTreeMap<(Uuid, NaiveDate), (i64, i64)>,
}

impl Sums {
    fn of(events: &[&UsageEvent]) -> Sums {
        let mut sums = Sums::default();
        for e in events {
            let allowed = e.outcome == Outcome::Allowed;
            let units = if allowed { i64::from(e.units) } else { 0 };
            let hour = e.ts.duration_trunc(TimeDelta::hours(1)).unwrap_or(e.ts);
            let h = sums.hourly.entry((e.org_id, hour, e.key_id)).or_default();
            if allowed {
                h.0 += 1;
            } else {
                h.1 += 1;
            }
            h.2 += units;
            let k = sums.keys.entry(e.key_id).or_insert((e.ts, 0));
            k.0 = k.0.max(e.ts);
            k.1 += 1;
            if allowed {
                let b = sums.billing.entry((e.org_id, month_of(e.ts))).or_default();
                b.0 += 1;
                b.1 += units;
            }
        }
        sums
    }
}

/// The first day of `ts`'s month (UTC).
pub(crate) fn month_of(ts: DateTime<Utc>) -> NaiveDate {
    NaiveDate::from_ymd_opt(ts.year(), ts.month(), 1).expect("the first of a month exists")
}

/// One field of every entry of `map`, in key order: a column for `unnest`.
fn column<K, V, T>(map: &BTreeMap<K, V>, field: impl Fn(&K, &V) -> T) -> Vec<T> {
    map.iter().map(|(k, v)| field(k, v)).collect()
}

/// The rows as one binary COPY stream; `user_agents` has resolved every user agent of `events`.
pub fn encode(events: &[&UsageEvent], user_agents: &UserAgents) -> Vec<u8> {
    // About 140 bytes per typical row; the Vec grows if needed.
    let mut copy = CopyEncoder::new(USAGE_COLUMNS.len() as u16, events.len() * 160);
    for event in events {
        copy.row();
        for (_, encode) in USAGE_COLUMNS {
            encode(event, user_agents, &mut copy);
        }
    }
    copy.finish()
}

/// The `COPY … FROM STDIN (FORMAT binary)` statement for [`encode`]'s output into `table`.
pub fn copy_statement(table: &str) -> String {
    format!("COPY {table} ({}) FROM STDIN (FORMAT binary)", column_list())
}

fn column_list() -> String {
    USAGE_COLUMNS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// A unique violation: some event of the batch is already in `api_usage`.
fn is_duplicate(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).is_some_and(|code| code == "23505")
}

/// Deadlock or serialization failure: the transaction lost a race and can simply run again.
pub(crate) fn is_conflict(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).is_some_and(|code| code == "40P01" || code == "40001")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(org: u128, key: u128, at: &str, outcome: Outcome, units: u32) -> UsageEvent {
        UsageEvent {
            event_id: Uuid::now_v7(),
            ts: at.parse().expect("time"),
            org_id: Uuid::from_u128(org),
            key_id: Uuid::from_u128(key),
            outcome,
            method: "GET".into(),
            path: "/".into(),
            client_ip: None,
            user_agent: None,
            request_id: None,
            units,
            latency_us: 1,
            shadow_outcome: None,
        }
    }

    #[test]
    fn sums_count_allowed_units_only_and_split_by_utc_hour_and_month() {
        let events = [
            event(1, 10, "2026-11-30T23:10:00Z", Outcome::Allowed, 3),
            event(1, 10, "2026-11-30T23:50:00Z", Outcome::RateLimited, 5),
            event(1, 10, "2026-12-01T00:00:00Z", Outcome::Allowed, 1),
            event(2, 20, "2026-11-30T23:59:59Z", Outcome::Revoked, 1),
        ];
        let sums = Sums::of(&events.iter().collect::<Vec<_>>());
        let at = |s: &str| s.parse::<DateTime<Utc>>().expect("time");
        let hourly: Vec<_> = sums.hourly.into_iter().collect();
        assert_eq!(
            hourly,
            vec![
                ((Uuid::from_u128(1), at("2026-11-30T23:00:00Z"), Uuid::from_u128(10)), (1, 1, 3)),
                ((Uuid::from_u128(1), at("2026-12-01T00:00:00Z"), Uuid::from_u128(10)), (1, 0, 1)),
                ((Uuid::from_u128(2), at("2026-11-30T23:00:00Z"), Uuid::from_u128(20)), (0, 1, 0)),
            ]
        );
        let keys: Vec<_> = sums.keys.into_iter().collect();
        assert_eq!(
            keys,
            vec![
                (Uuid::from_u128(10), (at("2026-12-01T00:00:00Z"), 3)),
                (Uuid::from_u128(20), (at("2026-11-30T23:59:59Z"), 1)),
            ]
        );
        let month = |m| NaiveDate::from_ymd_opt(2026, m, 1).expect("date");
        let billing: Vec<_> = sums.billing.into_iter().collect();
        assert_eq!(billing, vec![((Uuid::from_u128(1), month(11)), (1, 3)), ((Uuid::from_u128(1), month(12)), (1, 1))]);
    }
}
