//! The decision on an identified key, as a pure function of its record, the time and what the route requires.

use chrono::{DateTime, Utc};
use tollgate_shared::domain::{Outcome, Role};

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

/// What a route requires of a key (gateways set this per route): every listed scope, and at least a role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirement {
    pub scopes: Vec<String>,
    pub role: Option<Role>,
}

impl Requirement {
    /// Guest < user < admin.
    pub fn rank(role: Role) -> u8 {
        match role {
            Role::Guest => 0,
            Role::User => 1,
            Role::Admin => 2,
        }
    }

    /// Admin satisfies every role, user satisfies user and guest, guest only guest.
    pub fn is_met_by(&self, record: &KeyRecord) -> bool {
        self.role.is_none_or(|role| Requirement::rank(record.role) >= Requirement::rank(role))
            && self.scopes.iter().all(|scope| record.scopes.iter().any(|s| s == scope))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use tollgate_shared::domain::Role;
    use uuid::Uuid;

    fn good() -> KeyRecord {
        KeyRecord {
            id: Uuid::now_v7(),
            org_id: Uuid::now_v7(),
            name: "k".into(),
            role: Role::User,
            scopes: vec![],
            custom_rate_limit_per_minute: None,
            active: true,
            expires_at: None,
            revoked_at: None,
            org_active: true,
            org_rate_limit_per_minute: Some(60),
            org_monthly_request_limit: None,
            org_shadow: false,
            tier_window_limit: Some(100),
            tier_window_seconds: 3600,
            tier_burst_limit: None,
            tier_burst_seconds: 60,
            tier_shadow: false,
        }
    }

    #[test]
    fn requirements_need_every_scope_and_a_high_enough_role() {
        let key = KeyRecord { scopes: vec!["read".into(), "write".into()], ..good() };
        let need = |scopes: &[&str], role| Requirement { scopes: scopes.iter().map(|s| s.to_string()).collect(), role };
        assert!(need(&[], None).is_met_by(&key));
        assert!(need(&["read", "write"], Some(Role::Guest)).is_met_by(&key));
        assert!(!need(&["read", "admin"], None).is_met_by(&key));
        assert!(!need(&[], Some(Role::Admin)).is_met_by(&key));
        assert!(need(&[], Some(Role::User)).is_met_by(&KeyRecord { role: Role::Admin, ..good() }));
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
