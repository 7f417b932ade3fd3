//! Clients the bad-key limit has blocked, remembered until their block passes: everything such a client sends gets
//! 429 anyway, save a key this validator holds, so the rest (made-up keys, above all) costs no Redis call and no
//! PostgreSQL lookup.

use std::net::IpAddr;
use std::time::Instant;

use quick_cache::sync::Cache;

use crate::limiter::Usage;

/// Blocked clients remembered at most: a flood from more addresses than this costs what it did before, no more.
const CAPACITY: usize = 10_000;

pub struct BlockedIps(Cache<IpAddr, Block>);

#[derive(Clone, Copy)]
struct Block {
    /// The denial that blocked the client.
    usage: Usage,
    at: Instant,
}

impl BlockedIps {
    pub fn new() -> BlockedIps {
        BlockedIps(Cache::new(CAPACITY))
    }

    /// Remembers that the limit denied `client` (an address as the limit counts clients), as `usage` says, until
    /// `usage` frees up.
    pub fn block(&self, client: IpAddr, usage: Usage) {
        self.0.insert(client, Block { usage, at: Instant::now() });
    }

    /// The denial `client` would get now, if it is still blocked: the one that blocked it, on the limiter's clock moved
    /// on by the time since.
    pub fn check(&self, client: IpAddr) -> Option<Usage> {
        let block = self.0.get(&client)?;
        let since_us = i64::try_from(block.at.elapsed().as_micros()).unwrap_or(i64::MAX);
        let now_us = block.usage.now_us.saturating_add(since_us);
        if now_us >= block.usage.reset_at_us {
            // Not a newer block made meanwhile.
            self.0.remove_if(&client, |current| current.at == block.at);
            return None;
        }
        Some(Usage { now_us, ..block.usage })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limiter::LimitKind;

    fn denial(frees_in: Duration) -> Usage {
        let now_us = 1_700_000_000_000_000;
        Usage {
            kind: LimitKind::Ip,
            limit: 5,
            used: 5,
            window_seconds: 60,
            reset_at_us: now_us + i64::try_from(frees_in.as_micros()).expect("small"),
            now_us,
            never_fits: false,
        }
    }

    #[test]
    fn a_block_holds_until_it_frees_up() {
        let blocked = BlockedIps::new();
        blocked.block("203.0.113.7".parse().expect("ip"), denial(Duration::from_millis(200)));
        blocked.block("2001:db8:1:2::".parse().expect("ip"), denial(Duration::from_secs(60)));

        let again = blocked.check("203.0.113.7".parse().expect("ip")).expect("still blocked");
        assert!(again.now_us > denial(Duration::ZERO).now_us, "its clock moved on");
        assert!(blocked.check("203.0.113.8".parse().expect("ip")).is_none(), "another client");
        assert!(blocked.check("2001:db8:1:3::".parse().expect("ip")).is_none(), "another /64");

        std::thread::sleep(Duration::from_millis(250));
        assert!(blocked.check("203.0.113.7".parse().expect("ip")).is_none(), "freed up");
        assert!(blocked.check("2001:db8:1:2::".parse().expect("ip")).is_some(), "a longer block holds");
    }
}
