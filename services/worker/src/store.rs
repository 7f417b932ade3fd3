//! Writing a batch of usage events to PostgreSQL exactly once.
//!
//! One statement inserts the batch (`UNNEST` of column arrays) with `ON CONFLICT DO NOTHING`, and from the rows it
//! actually inserted (`RETURNING`) adds to `usage_hourly` and to the keys' `last_used_at`/`total_requests`. A
//! re-delivered event inserts nothing, so it changes nothing downstream either.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use sqlx::types::ipnetwork::IpNetwork;
use sqlx::PgPool;
use uuid::Uuid;

use tollgate_shared::event::UsageEvent;

const WRITE_BATCH: &str = "
WITH inserted AS (
    INSERT INTO api_usage (event_id, ts, org_id, key_id, units, latency_us, outcome, method, path, client_ip,
                           user_agent, request_id, shadow_outcome)
    SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::int4[], $6::int4[], $7::text[],
                         $8::text[], $9::text[], $10::inet[], $11::text[], $12::text[], $13::text[])
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
), key_use AS (
    UPDATE api_keys k
       SET last_used_at = GREATEST(k.last_used_at, u.last_ts), total_requests = k.total_requests + u.n
      FROM (SELECT key_id, max(ts) AS last_ts, count(*) AS n FROM inserted GROUP BY key_id) u
     WHERE k.id = u.key_id
)
SELECT count(*) FROM inserted";

/// Writes usage batches; remembers which monthly partitions exist so it only asks once per month.
pub struct UsageStore {
    pool: PgPool,
    partitions: HashSet<(i32, u32)>,
}

/// What a batch did: rows inserted, and events that were already there (re-deliveries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub inserted: u64,
    pub duplicates: u64,
}

impl UsageStore {
    pub fn new(pool: PgPool) -> UsageStore {
        UsageStore { pool, partitions: HashSet::new() }
    }

    /// Writes `events` in one transaction. Events repeated within the batch are written once.
    pub async fn write(&mut self, events: &[UsageEvent]) -> Result<Written, sqlx::Error> {
        let mut seen = HashSet::with_capacity(events.len());
        let events: Vec<&UsageEvent> = events.iter().filter(|e| seen.insert(e.event_id)).collect();
        self.ensure_partitions(&events).await?;
        let columns = Columns::from(&events);
        let inserted: i64 = sqlx::query_scalar(WRITE_BATCH)
            .bind(columns.event_id)
            .bind(columns.ts)
            .bind(columns.org_id)
            .bind(columns.key_id)
            .bind(columns.units)
            .bind(columns.latency_us)
            .bind(columns.outcome)
            .bind(columns.method)
            .bind(columns.path)
            .bind(columns.client_ip)
            .bind(columns.user_agent)
            .bind(columns.request_id)
            .bind(columns.shadow_outcome)
            .fetch_one(&self.pool)
            .await?;
        let inserted = u64::try_from(inserted).unwrap_or(0);
        Ok(Written { inserted, duplicates: events.len() as u64 - inserted })
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

/// The batch as column arrays, for `UNNEST`.
struct Columns {
    event_id: Vec<Uuid>,
    ts: Vec<DateTime<Utc>>,
    org_id: Vec<Uuid>,
    key_id: Vec<Uuid>,
    units: Vec<i32>,
    latency_us: Vec<i32>,
    outcome: Vec<&'static str>,
    method: Vec<String>,
    path: Vec<String>,
    client_ip: Vec<Option<IpNetwork>>,
    user_agent: Vec<Option<String>>,
    request_id: Vec<Option<String>>,
    shadow_outcome: Vec<Option<&'static str>>,
}

impl Columns {
    fn from(events: &[&UsageEvent]) -> Columns {
        let clamp = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        Columns {
            event_id: events.iter().map(|e| e.event_id).collect(),
            ts: events.iter().map(|e| e.ts).collect(),
            org_id: events.iter().map(|e| e.org_id).collect(),
            key_id: events.iter().map(|e| e.key_id).collect(),
            units: events.iter().map(|e| clamp(e.units)).collect(),
            latency_us: events.iter().map(|e| clamp(e.latency_us)).collect(),
            outcome: events.iter().map(|e| e.outcome.as_str()).collect(),
            method: events.iter().map(|e| e.method.clone()).collect(),
            path: events.iter().map(|e| e.path.clone()).collect(),
            client_ip: events.iter().map(|e| e.client_ip.map(IpNetwork::from)).collect(),
            user_agent: events.iter().map(|e| e.user_agent.clone()).collect(),
            request_id: events.iter().map(|e| e.request_id.clone()).collect(),
            shadow_outcome: events.iter().map(|e| e.shadow_outcome.map(|o| o.as_str())).collect(),
        }
    }
}
