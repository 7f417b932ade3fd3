//! The monthly quota counters in Redis: the contract between the workers, which maintain them, and the validator,
//! which reads them.
//!
//! Key `{redis_prefix}quota:{org_id}:{YYYY-MM}` (UTC month, hyphenated lowercase UUID); value: the integer units of
//! allowed requests committed to PostgreSQL for that organization and month. Workers only ever raise a counter to
//! a total read back from PostgreSQL in the transaction that committed it, so the value is never ahead of
//! PostgreSQL; a missing counter is rebuilt from `billing_periods`.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use uuid::Uuid;

/// The counter's Redis key for `org_id` in the month containing `month` (any day of it).
pub fn key(redis_prefix: &str, org_id: Uuid, month: NaiveDate) -> String {
    format!("{redis_prefix}quota:{}:{:04}-{:02}", org_id.hyphenated(), month.year(), month.month())
}

/// The counter's Redis key for the month `at` falls in.
pub fn key_at(redis_prefix: &str, org_id: Uuid, at: DateTime<Utc>) -> String {
    key(redis_prefix, org_id, at.date_naive())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_follows_the_contract() {
        let org: Uuid = "0192F3C4-0000-7000-8000-00000000000A".parse().expect("uuid");
        let month = NaiveDate::from_ymd_opt(2026, 3, 17).expect("date");
        assert_eq!(key("tollgate:", org, month), "tollgate:quota:0192f3c4-0000-7000-8000-00000000000a:2026-03");
    }
}
