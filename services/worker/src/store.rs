//! Writing a batch of usage events to PostgreSQL exactly once.
//!
//! One transaction per batch: the rows go by binary `COPY` into a session-local staging table, then one statement
//! moves them into `api_usage` with `ON CONFLICT DO NOTHING` and, from the rows it actually inserted (`RETURNING`),
//! adds to `usage_hourly`, to `billing_periods` and to the keys' `last_used_at`/`total_requests` (one update per
//! key per batch). A re-delivered event inserts nothing, so it changes nothing downstream either. The statement
//! returns the new monthly totals of the organizations it touched, for the Redis quota counters.
//!
//! Lock order: every upsert takes its rows sorted by primary key, so concurrent workers touching the same keys,
//! hours and organizations queue behind each other instead of deadlocking; a deadlock or serialization failure that
//! still happens is retried at once (a few times) before the error reaches the worker's backoff loop.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sqlx::{Executor, PgPool};
use uuid::Uuid;

use tollgate_shared::event::UsageEvent;

use crate::copy::CopyEncoder;

/// Encodes one column of a usage row for binary COPY.
type Encode = fn(&UsageEvent, &mut CopyEncoder);

/// The columns a worker writes to `api_usage`, in order, with their encoders: the only list of them (the COPY,
/// the staging table's use and the insert are all derived from it), so adding a column is one line here.
const USAGE_COLUMNS: &[(&str, Encode)] = &[
    ("event_id", |e, c| c.uuid(e.event_id)),
    ("ts", |e, c| c.timestamptz(e.ts)),
    ("org_id", |e, c| c.uuid(e.org_id)),
    ("key_id", |e, c| c.uuid(e.key_id)),
    ("units", |e, c| c.int4(clamp(e.units))),
    ("latency_us", |e, c| c.int4(clamp(e.latency_us))),
    ("outcome", |e, c| c.text(e.outcome.as_str())),
    ("method", |e, c| c.text(&e.method)),
    ("path", |e, c| c.text(&e.path)),
    ("client_ip", |e, c| c.inet_opt(e.client_ip)),
    ("user_agent", |e, c| c.text_opt(e.user_agent.as_deref())),
    ("request_id", |e, c| c.text_opt(e.request_id.as_deref())),
    ("shadow_outcome", |e, c| c.text_opt(e.shadow_outcome.map(|o| o.as_str()))),
];

fn clamp(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A staging table per session: `LIKE api_usage` follows the schema, and `ON COMMIT DELETE ROWS` empties it at
/// every commit. `client_min_messages` hides the "already exists" notice the second time round.
const CREATE_STAGING: &str = "SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS usage_staging (LIKE api_usage INCLUDING DEFAULTS) ON COMMIT DELETE ROWS";

/// `{columns}` is replaced by [`USAGE_COLUMNS`]' names. The first result row carries the number of rows inserted
/// (org_id NULL); the others the new totals of each (organization, month) the batch billed.
const MOVE_STAGED: &str = "
WITH inserted AS (
    INSERT INTO api_usage ({columns})
    SELECT {columns} FROM usage_staging ORDER BY event_id
    ON CONFLICT DO NOTHING
    RETURNING org_id, key_id, ts, units, outcome
), hourly AS (
    INSERT INTO usage_hourly AS h (org_id, hour, key_id, allowed, denied, units)
    SELECT org_id, date_trunc('hour', ts, 'UTC'), key_id,
           count(*) FILTER (WHERE outcome = 'allowed'),
           count(*) FILTER (WHERE outcome <> 'allowed'),
           coalesce(sum(units) FILTER (WHERE outcome = 'allowed'), 0)
    FROM inserted
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (org_id, hour, key_id) DO UPDATE
        SET allowed = h.allowed + EXCLUDED.allowed,
            denied = h.denied + EXCLUDED.denied,
            units = h.units + EXCLUDED.units
), billed AS (
    INSERT INTO billing_periods AS b (org_id, month, plan, requests, units, included_units,
                                      price_per_thousand_minor, currency)
    SELECT a.org_id, a.month, coalesce(o.plan, 'free'), a.requests, a.units, coalesce(p.included_units, 0),
           coalesce(p.price_per_thousand_minor, 0), coalesce(p.currency, 'USD')
    FROM (SELECT org_id, date_trunc('month', ts AT TIME ZONE 'UTC')::date AS month,
                 count(*) AS requests, sum(units) AS units
          FROM inserted WHERE outcome = 'allowed' GROUP BY 1, 2) a
    LEFT JOIN organizations o ON o.id = a.org_id
    LEFT JOIN plans p ON p.name = o.plan
    ORDER BY 1, 2
    ON CONFLICT (org_id, month) DO UPDATE
        SET requests = b.requests + EXCLUDED.requests,
            units = b.units + EXCLUDED.units,
            updated_at = now()
    RETURNING org_id, month, units
), key_use AS (
    UPDATE api_keys k
       SET last_used_at = GREATEST(k.last_used_at, u.last_ts), total_requests = k.total_requests + u.n
      FROM (SELECT key_id, max(ts) AS last_ts, count(*) AS n FROM inserted GROUP BY key_id ORDER BY key_id) u
     WHERE k.id = u.key_id
)
SELECT NULL::uuid, NULL::date, count(*)::int8 FROM inserted
UNION ALL
SELECT org_id, month, units FROM billed";

/// Immediate retries of a batch that lost a deadlock or a serialization conflict.
const CONFLICT_RETRIES: usize = 3;

/// Writes usage batches; remembers which monthly partitions exist so it only asks once per month.
pub struct UsageStore {
    pool: PgPool,
    partitions: HashSet<(i32, u32)>,
    copy_statement: String,
    move_statement: String,
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
            copy_statement: copy_statement("usage_staging"),
            move_statement: MOVE_STAGED.replace("{columns}", &column_list()),
        }
    }

    /// Writes `events` in one transaction. Events repeated within the batch are written once.
    pub async fn write(&mut self, events: &[UsageEvent]) -> Result<Written, sqlx::Error> {
        let mut seen = HashSet::with_capacity(events.len());
        let events: Vec<&UsageEvent> = events.iter().filter(|e| seen.insert(e.event_id)).collect();
        if events.is_empty() {
            return Ok(Written::default());
        }
        self.ensure_partitions(&events).await?;
        let rows = bytes::Bytes::from(encode(&events));
        let mut attempt = 0;
        loop {
            match self.write_once(rows.clone()).await {
                Err(e) if is_conflict(&e) && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "batch lost a lock conflict; retrying at once");
                }
                Err(e) => return Err(e),
                Ok((inserted, totals)) => {
                    return Ok(Written { inserted, duplicates: events.len() as u64 - inserted, totals });
                }
            }
        }
    }

    async fn write_once(&self, rows: bytes::Bytes) -> Result<(u64, Vec<PeriodTotal>), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // A plain string without arguments goes by the simple query protocol, which allows two statements.
        (&mut *tx).execute(CREATE_STAGING).await?;
        let mut copy = tx.copy_in_raw(&self.copy_statement).await?;
        copy.send(rows).await?;
        copy.finish().await?;
        let result: Vec<(Option<Uuid>, Option<NaiveDate>, i64)> =
            sqlx::query_as(&self.move_statement).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let mut inserted = 0;
        let mut totals = Vec::new();
        for row in result {
            match row {
                (Some(org_id), Some(month), units) => totals.push(PeriodTotal { org_id, month, units }),
                (_, _, count) => inserted = u64::try_from(count).unwrap_or(0),
            }
        }
        Ok((inserted, totals))
    }

    async fn ensure_partitions(&mut self, events: &[&UsageEvent]) -> Result<(), sqlx::Error> {
        let months: HashSet<(i32, u32)> = events.iter().map(|e| (e.ts.year(), e.ts.month())).collect();
        for (year, month) in months {
            if self.partitions.contains(&(year, month)) {
                continue;
            }
            let first_day: DateTime<Utc> =
                Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single().expect("the first of a month exists");
            sqlx::query("SELECT tollgate_ensure_usage_partition($1)").bind(first_day).execute(&self.pool).await?;
            self.partitions.insert((year, month));
        }
        Ok(())
    }
}

/// The rows as one binary COPY stream.
pub fn encode(events: &[&UsageEvent]) -> Vec<u8> {
    // About 140 bytes per typical row; the Vec grows if needed.
    let mut copy = CopyEncoder::new(USAGE_COLUMNS.len() as u16, events.len() * 160);
    for event in events {
        copy.row();
        for (_, encode) in USAGE_COLUMNS {
            encode(event, &mut copy);
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

/// Deadlock or serialization failure: the transaction lost a race and can simply run again.
pub(crate) fn is_conflict(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).is_some_and(|code| code == "40P01" || code == "40001")
}
