//! `tollgate usage reconcile`: checks, for every organization and month, that billing requests = the sum of
//! `usage_hourly.allowed` = the count of allowed rows in `api_usage` (and the same for units), and compares the
//! Redis quota counters with `billing_periods`, repairing them on request.
//!
//! Counters are read after PostgreSQL and a drifting one is compared again with a fresh read of its billing row:
//! a worker sets a counter only after its commit, so a counter above that fresh read is a real anomaly, while one
//! below it is either lost (Redis flush) or about to be raised by a worker. A repair is a compare-and-set against
//! the value observed, so it never undoes a newer total a worker wrote meanwhile.

use chrono::NaiveDate;
use sqlx::PgPool;
use uuid::Uuid;

use tollgate_shared::metrics::QUOTA_DRIFT;

use crate::quota::QuotaCounters;
use crate::store::{month_of, PeriodTotal};

/// Which organizations and months to check (None = all).
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter {
    pub org_id: Option<Uuid>,
    /// First day of the month.
    pub month: Option<NaiveDate>,
}

/// One organization and month.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeriodCheck {
    pub org_id: Uuid,
    pub month: NaiveDate,
    pub billing_requests: i64,
    pub hourly_allowed: i64,
    pub rows_allowed: i64,
    pub billing_units: i64,
    pub hourly_units: i64,
    pub rows_units: i64,
    /// The Redis counter (None when missing, not read, or for a past month, whose counter is not compared).
    pub counter: Option<i64>,
    /// Counter minus committed units (0 when they agree); None when the counter was not compared.
    pub drift: Option<i64>,
    /// The counter was set to the committed units.
    pub repaired: bool,
}

impl PeriodCheck {
    /// Billing, the hourly rollup and the rows agree on requests and on units.
    pub fn invariant_holds(&self) -> bool {
        self.billing_requests == self.hourly_allowed
            && self.hourly_allowed == self.rows_allowed
            && self.billing_units == self.hourly_units
            && self.hourly_units == self.rows_units
    }
}

/// What a reconcile found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub periods: Vec<PeriodCheck>,
    /// Organization-months whose three counts differ.
    pub violations: usize,
    /// Sum of |drift| over all counters, before any repair; None when the counters were not read (Redis away).
    pub drift_units: Option<i64>,
    pub repaired: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot read usage from PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot read or repair the Redis quota counters: {0}")]
    Redis(#[from] redis::RedisError),
}

const CHECK: &str = "
WITH b AS (
    SELECT org_id, month, requests, units FROM billing_periods
    WHERE ($1::uuid IS NULL OR org_id = $1) AND ($2::date IS NULL OR month = $2)
), h AS (
    SELECT org_id, date_trunc('month', hour AT TIME ZONE 'UTC')::date AS month, sum(allowed) AS allowed,
           sum(units) AS units
    FROM usage_hourly
    WHERE ($1::uuid IS NULL OR org_id = $1)
      AND ($2::date IS NULL OR (hour >= $2::timestamp AT TIME ZONE 'UTC'
                                AND hour < ($2::date + interval '1 month') AT TIME ZONE 'UTC'))
    GROUP BY 1, 2
), r AS (
    SELECT org_id, date_trunc('month', ts AT TIME ZONE 'UTC')::date AS month, count(*) AS allowed,
           sum(units) AS units
    FROM api_usage
    WHERE outcome = 'allowed' AND ($1::uuid IS NULL OR org_id = $1)
      AND ($2::date IS NULL OR (ts >= $2::timestamp AT TIME ZONE 'UTC'
                                AND ts < ($2::date + interval '1 month') AT TIME ZONE 'UTC'))
    GROUP BY 1, 2
)
SELECT org_id, month, coalesce(b.requests, 0), coalesce(h.allowed, 0)::int8, coalesce(r.allowed, 0),
       coalesce(b.units, 0), coalesce(h.units, 0)::int8, coalesce(r.units, 0)::int8
FROM b FULL JOIN h USING (org_id, month) FULL JOIN r USING (org_id, month)
WHERE coalesce(b.requests, 0) + coalesce(h.allowed, 0) + coalesce(r.allowed, 0) > 0
ORDER BY month, org_id";

type CheckRow = (Uuid, NaiveDate, i64, i64, i64, i64, i64, i64);

/// The first day of the current month (UTC): the month whose counters validators read.
fn this_month() -> NaiveDate {
    month_of(chrono::Utc::now())
}

/// Checks the invariant and, with `quota`, the counters; with `repair`, sets missing or drifting counters to
/// PostgreSQL's total.
pub async fn reconcile(
    pool: &PgPool,
    mut quota: Option<&mut QuotaCounters>,
    filter: Filter,
    repair: bool,
) -> Result<Report, ReconcileError> {
    let rows: Vec<CheckRow> = sqlx::query_as(CHECK).bind(filter.org_id).bind(filter.month).fetch_all(pool).await?;
    // Only this month's counters are read by the validators: a past month's expires some days after the month, and
    // comparing with one that is gone would report drift that nothing needs repaired.
    let this_month = this_month();
    let totals: Vec<PeriodTotal> = rows
        .iter()
        .filter(|r| r.1 == this_month)
        .map(|r| PeriodTotal { org_id: r.0, month: r.1, units: r.5 })
        .collect();
    let mut counters = match quota.as_deref_mut() {
        Some(quota) => quota.read(&totals).await?,
        None => Vec::new(),
    }
    .into_iter();
    let mut periods = Vec::with_capacity(rows.len());
    for row in rows {
        let counted = row.1 == this_month && quota.is_some();
        let stored = if counted { counters.next().flatten() } else { None };
        let counter = units_in(stored.as_deref());
        let (org_id, month, billing_requests, hourly_allowed, rows_allowed, billing_units, hourly_units, rows_units) =
            row;
        let mut check = PeriodCheck {
            org_id,
            month,
            billing_requests,
            hourly_allowed,
            rows_allowed,
            billing_units,
            hourly_units,
            rows_units,
            counter,
            drift: counted.then_some(0),
            repaired: false,
        };
        if counted && counter != Some(billing_units) {
            let committed = committed_units(pool, org_id, month).await?;
            check.drift = Some(counter.unwrap_or(0) - committed);
            if let Some(quota) = quota.as_deref_mut().filter(|_| repair && counter != Some(committed)) {
                let total = PeriodTotal { org_id, month, units: committed };
                check.repaired = quota.replace_if(&total, stored.as_deref()).await?;
            }
        }
        periods.push(check);
    }
    let violations = periods.iter().filter(|p| !p.invariant_holds()).count();
    let drift_units = quota.is_some().then(|| periods.iter().filter_map(|p| p.drift).map(i64::abs).sum());
    let repaired = periods.iter().filter(|p| p.repaired).count();
    Ok(Report { periods, violations, drift_units, repaired })
}

/// The units a counter holds; none when it is missing or holds what is not a whole number.
fn units_in(stored: Option<&[u8]>) -> Option<i64> {
    std::str::from_utf8(stored?).ok()?.parse().ok()
}

/// An organization's committed units for a month, read afresh: a worker may have committed (and be about to
/// raise the counter) since an earlier read.
async fn committed_units(pool: &PgPool, org_id: Uuid, month: NaiveDate) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce((SELECT units FROM billing_periods WHERE org_id = $1 AND month = $2), 0)")
        .bind(org_id)
        .bind(month)
        .fetch_one(pool)
        .await
}

/// The quota counters of `month` against `billing_periods` only (cheap: no scan of the usage rows); sets the
/// drift gauge and returns the drift in units.
pub async fn counter_drift(pool: &PgPool, quota: &mut QuotaCounters, month: NaiveDate) -> Result<i64, ReconcileError> {
    let totals: Vec<PeriodTotal> = sqlx::query_as::<_, (Uuid, NaiveDate, i64)>(
        "SELECT org_id, month, units FROM billing_periods WHERE month = $1",
    )
    .bind(month)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(org_id, month, units)| PeriodTotal { org_id, month, units })
    .collect();
    let counters = quota.read(&totals).await?;
    let mut drift = 0;
    for (total, stored) in totals.iter().zip(counters) {
        let counter = units_in(stored.as_deref());
        if counter != Some(total.units) {
            drift += (counter.unwrap_or(0) - committed_units(pool, total.org_id, total.month).await?).abs();
        }
    }
    metrics::gauge!(QUOTA_DRIFT).set(drift as f64);
    Ok(drift)
}

/// Keeps the drift gauge of the current month's counters fresh in a long-running process, every `every`, until
/// `shutdown`. It only reports: repairs are the next batch's or `tollgate usage reconcile --fix`'s job.
pub async fn watch_counter_drift(
    pool: PgPool,
    mut quota: QuotaCounters,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match counter_drift(&pool, &mut quota, this_month()).await {
            Ok(0) => {}
            Ok(drift) => tracing::info!(drift, "quota counters differ from PostgreSQL (a lagging or lost counter)"),
            Err(e) => tracing::warn!(error = %e, "cannot compare the quota counters with PostgreSQL"),
        }
    }
}
