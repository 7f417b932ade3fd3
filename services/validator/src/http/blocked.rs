//! Client addresses past their bad-key limit, remembered by this process until the limit lets them in again: a
//! flood of made-up keys from one of them then costs no PostgreSQL query and no Redis call, only the key cache's
//! answer that it does not hold the key (see [`super::AppState::decide`]).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;

use crate::limiter::{client_network, Usage};

/// Addresses remembered at most: a bound on memory. One forgotten is only asked about in Redis again.
const CAPACITY: usize = 100_000;

pub struct BlockedIps(Cache<IpAddr, Blocked>);

#[derive(Clone, Copy)]
struct Blocked {
    /// The denial, as the limiter gave it.
    usage: Usage,
    until: Instant,
}

impl BlockedIps {
    pub fn new() -> BlockedIps {
        BlockedIps(Cache::new(CAPACITY))
    }

    /// Remembers that the limiter denied `ip` with `usage`, until the time it names.
    pub fn block(&self, ip: IpAddr, usage: Usage) {
        let wait = Duration::from_micros(u64::try_from(usage.reset_at_us - usage.now_us).unwrap_or(0));
        self.0.insert(client_network(ip), Blocked { usage, until: Instant::now() + wait });
    }

    /// The denial of `ip` as it stands now, while it holds.
    pub fn get(&self, ip: IpAddr) -> Option<Usage> {
        let network = client_network(ip);
        let blocked = self.0.get(&network)?;
        match blocked.until.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
            // The limiter's clock, moved on by the time that passed here, so Retry-After counts down.
            Some(left) => {
                let left_us = i64::try_from(left.as_micros()).unwrap_or(i64::MAX);
                Some(Usage { now_us: blocked.usage.reset_at_us.saturating_sub(left_us), ..blocked.usage })
            }
            None => {
                self.0.remove(&network);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::LimitKind;

    fn denial(now_us: i64, wait_us: i64) -> Usage {
        Usage { kind: LimitKind::Ip, limit: 5, used: 5, window_seconds: 60, reset_at_us: now_us + wait_us, now_us }
    }

    #[test]
    fn an_address_is_blocked_until_its_limit_lets_it_in_with_its_neighbours_in_its_64() {
        let blocked = BlockedIps::new();
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        blocked.block(ip("203.0.113.7"), denial(1_000_000, 30_000_000));
        blocked.block(ip("2001:db8:1:2::1"), denial(1_000_000, 30_000_000));
        blocked.block(ip("198.51.100.1"), denial(1_000_000, 0));

        let usage = blocked.get(ip("203.0.113.7")).expect("blocked");
        let retry_after = usage.reset_at_us - usage.now_us;
        assert!((29_000_000..=30_000_000).contains(&retry_after), "{retry_after}");
        assert!(blocked.get(ip("::ffff:203.0.113.7")).is_some());
        assert!(blocked.get(ip("2001:db8:1:2:ffff::9")).is_some());
        assert!(blocked.get(ip("203.0.113.8")).is_none());
        assert!(blocked.get(ip("2001:db8:1:3::1")).is_none());
        assert!(blocked.get(ip("198.51.100.1")).is_none(), "a denial that ends now blocks nothing");
    }
}
