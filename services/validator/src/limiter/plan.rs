//! The limits that apply to a request: a key's own, its tier's and its organization's windows, and the
//! organization's monthly quota, read off its cached record; or a client IP's limit on bad keys.

use std::net::{IpAddr, Ipv6Addr};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use uuid::Uuid;

use crate::keys::KeyRecord;

/// Which limit decided; a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Key,
    Tier,
    Org,
    Quota,
    Ip,
}

impl LimitKind {
    pub(super) const ALL: [LimitKind; 5] =
        [LimitKind::Key, LimitKind::Tier, LimitKind::Org, LimitKind::Quota, LimitKind::Ip];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Key => "key",
            LimitKind::Tier => "tier",
            LimitKind::Org => "org",
            LimitKind::Quota => "quota",
            LimitKind::Ip => "ip",
        }
    }
}

/// Whose requests a window counts. With the window's length it names the counter in Redis (see `script::CounterKey`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Key(Uuid),
    /// A key under its tier's main window.
    TierWindow(Uuid),
    /// A key under its tier's burst window.
    TierBurst(Uuid),
    Org(Uuid),
    /// A client IP's bad-key answers.
    Ip(IpAddr),
}

impl Subject {
    pub fn kind(self) -> LimitKind {
        match self {
            Subject::Key(_) => LimitKind::Key,
            Subject::TierWindow(_) | Subject::TierBurst(_) => LimitKind::Tier,
            Subject::Org(_) => LimitKind::Org,
            Subject::Ip(_) => LimitKind::Ip,
        }
    }
}

/// A rolling-window limit on one counter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowLimit {
    pub subject: Subject,
    pub limit: u64,
    pub seconds: u32,
    pub shadow: bool,
}

impl WindowLimit {
    pub fn kind(&self) -> LimitKind {
        self.subject.kind()
    }
}

/// The organization's monthly quota: read here, counted by the workers.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaLimit {
    pub redis_key: String,
    pub limit: u64,
    /// Start of next month (UTC), in microseconds since the epoch.
    pub reset_at_us: i64,
    /// The month's length: its window, as `RateLimit-Policy` gives it (the time left is `reset_at_us`'s to tell).
    pub window_seconds: u64,
    pub shadow: bool,
}

/// The limits that apply to one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub windows: Vec<WindowLimit>,
    pub quota: Option<QuotaLimit>,
}

fn positive(n: Option<i64>) -> Option<u64> {
    n.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0)
}

fn seconds(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(1).max(1)
}

/// The Redis key of an organization's monthly quota counter (the workers maintain it): UTC calendar month.
pub fn quota_key(prefix: &str, org_id: Uuid, now: DateTime<Utc>) -> String {
    format!("{prefix}quota:{}:{:04}-{:02}", org_id.hyphenated(), now.year(), now.month())
}

impl Plan {
    /// Every limit that applies to a key, given its record (which carries its tier's and organization's limits).
    pub fn for_key(record: &KeyRecord, prefix: &str, now: DateTime<Utc>) -> Plan {
        let key = positive(record.custom_rate_limit_per_minute.map(i64::from)).map(|limit| WindowLimit {
            subject: Subject::Key(record.id),
            limit,
            seconds: 60,
            shadow: false,
        });
        let tier = [
            (Subject::TierWindow(record.id), record.tier_window_limit, record.tier_window_seconds),
            (Subject::TierBurst(record.id), record.tier_burst_limit, record.tier_burst_seconds),
        ]
        .into_iter()
        .filter_map(|(subject, limit, secs)| {
            let limit = positive(limit)?;
            Some(WindowLimit { subject, limit, seconds: seconds(secs), shadow: record.tier_shadow })
        });
        let org = positive(record.org_rate_limit_per_minute.map(i64::from)).map(|limit| WindowLimit {
            subject: Subject::Org(record.org_id),
            limit,
            seconds: 60,
            shadow: record.org_shadow,
        });
        let quota = positive(record.org_monthly_request_limit).map(|limit| QuotaLimit {
            redis_key: quota_key(prefix, record.org_id, now),
            limit,
            reset_at_us: next_month(now).timestamp_micros(),
            window_seconds: month_seconds(now),
            shadow: record.org_shadow,
        });
        Plan { windows: key.into_iter().chain(tier).chain(org).collect(), quota }
    }

    /// The bad-key limit of one client, as the caller counts clients (by [`client_network`], say).
    pub fn for_ip_failures(client: IpAddr, per_minute: u32) -> Plan {
        let limit =
            WindowLimit { subject: Subject::Ip(client), limit: u64::from(per_minute), seconds: 60, shadow: false };
        Plan { windows: vec![limit], quota: None }
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.quota.is_none()
    }

    /// Values of this plan's part of the script's reply: per window used and at, then the quota's used.
    pub(super) fn reply_len(&self) -> usize {
        2 * self.windows.len() + usize::from(self.quota.is_some())
    }
}

/// The addresses counted as one client: an IPv4 address (one seen through an IPv6 socket too), or an IPv6 /64, the
/// smallest block a subscriber is given, whose addresses it can use at will.
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        v4 => v4,
    }
}

fn next_month(now: DateTime<Utc>) -> DateTime<Utc> {
    let (year, month) = if now.month() == 12 { (now.year() + 1, 1) } else { (now.year(), now.month() + 1) };
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single().unwrap_or(now)
}

/// The length of `now`'s month (UTC), in seconds.
fn month_seconds(now: DateTime<Utc>) -> u64 {
    let start = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().unwrap_or(now);
    u64::try_from((next_month(now) - start).num_seconds()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Uuid = Uuid::from_u128(0x0190a0b0_0000_7000_8000_000000000001);

    #[test]
    fn quota_keys_name_the_utc_month() {
        let at = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).single().expect("time");
        assert_eq!(quota_key("tg:", ID, at), "tg:quota:0190a0b0-0000-7000-8000-000000000001:2026-12");
        assert_eq!(next_month(at), Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).single().expect("time"));
        assert_eq!(month_seconds(at), 31 * 86_400);
        let february = Utc.with_ymd_and_hms(2028, 2, 29, 12, 0, 0).single().expect("time");
        assert_eq!(month_seconds(february), 29 * 86_400);
    }

    #[test]
    fn an_ipv6_client_is_its_64_block() {
        let network = |text: &str| client_network(text.parse().expect("ip")).to_string();
        assert_eq!(network("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(network("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_eq!(network("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(network("203.0.113.5"), "203.0.113.5");
        assert_eq!(network("::ffff:203.0.113.5"), "203.0.113.5");
    }
}
