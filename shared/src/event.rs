//! The usage event: one per decision on an identified key, minted by the validator and written by the workers.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::Outcome;

/// One decision on an identified key. `event_id` is a UUIDv7 minted at decision time; it is the idempotency key
/// all the way into `api_usage`.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub event_id: Uuid,
    pub ts: DateTime<Utc>,
    pub org_id: Uuid,
    pub key_id: Uuid,
    pub outcome: Outcome,
    pub method: String,
    pub path: String,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// The request's cost; counts against every limit.
    pub units: u32,
    /// Time the validator spent deciding, in microseconds.
    pub latency_us: u32,
    /// What a shadow-mode limit would have decided for an allowed request it would have denied (e.g.
    /// `RateLimited`); `None` when no shadow limit objected.
    pub shadow_outcome: Option<Outcome>,
}
