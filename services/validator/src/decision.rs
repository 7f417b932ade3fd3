//! The decision on an identified key, as a pure function of its record and the time.

use chrono::{DateTime, Utc};
use tollgate_shared::domain::Outcome;

use crate::keys::KeyRecord;

/// Revoked beats expired beats disabled: the most specific reason an operator would want to see.
pub fn decide(record: &KeyRecord, now: DateTime<Utc>) -> Outcome {
    if record.revoked_at.is_some() {
        Outcome::Revoked
    } else if record.expires_at.is_some_and(|at| at <= now) {
        Outcome::Expired
    } else if !record.active || !record.org_active {
        Outcome::Disabled
    } else {
        Outcome::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use tollgate_shared::domain::{RateLimitTier, Role};
    use uuid::Uuid;

    fn good() -> KeyRecord {
        KeyRecord {
            id: Uuid::now_v7(),
            org_id: Uuid::now_v7(),
            name: "k".into(),
            role: Role::User,
            scopes: vec![],
            rate_limit_tier: RateLimitTier::Standard,
            custom_rate_limit_per_minute: None,
            active: true,
            expires_at: None,
            revoked_at: None,
            org_active: true,
            org_rate_limit_per_minute: Some(60),
            org_monthly_request_limit: None,
        }
    }

    #[test]
    fn each_reason_is_reported() {
        let now = Utc::now();
        assert_eq!(decide(&good(), now), Outcome::Allowed);
        let future = KeyRecord { expires_at: Some(now + TimeDelta::seconds(1)), ..good() };
        assert_eq!(decide(&future, now), Outcome::Allowed);
        let expired = KeyRecord { expires_at: Some(now), ..good() };
        assert_eq!(decide(&expired, now), Outcome::Expired);
        assert_eq!(decide(&KeyRecord { active: false, ..good() }, now), Outcome::Disabled);
        assert_eq!(decide(&KeyRecord { org_active: false, ..good() }, now), Outcome::Disabled);
        let revoked = KeyRecord { revoked_at: Some(now), active: false, expires_at: Some(now), ..good() };
        assert_eq!(decide(&revoked, now), Outcome::Revoked);
        let expired_and_deactivated = KeyRecord { active: false, ..expired };
        assert_eq!(decide(&expired_and_deactivated, now), Outcome::Expired);
    }
}
