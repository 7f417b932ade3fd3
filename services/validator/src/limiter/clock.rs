//! Redis's clock, as this host reads it.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeDelta, Utc};

/// This host's clock, set by how far Redis's was ahead of it at the last script call. Redis's clock stamps
/// the usage events and so picks the month the workers count them in; read through this, every validator agrees
/// with it on a key's expiry and on the quota's month, however far its own clock has drifted. (The offset includes
/// the reply's way back, well under a millisecond.)
#[derive(Debug, Default)]
pub struct RedisClock {
    ahead_us: AtomicI64,
}

impl RedisClock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::microseconds(self.ahead_us.load(Ordering::Relaxed))
    }

    /// Redis's clock read `redis_now_us` (µs since the epoch) a moment ago.
    pub fn observe(&self, redis_now_us: i64) {
        let ahead = redis_now_us.saturating_sub(Utc::now().timestamp_micros());
        self.ahead_us.store(ahead, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_reads_this_hosts_clock_moved_by_how_far_redis_was_ahead() {
        let clock = RedisClock::default();
        // In whole seconds, rounded: a few microseconds pass between observing and reading.
        let lag = |clock: &RedisClock| ((clock.now() - Utc::now()).num_milliseconds() + 500).div_euclid(1000);
        assert_eq!(lag(&clock), 0, "nothing observed yet: this host's clock");
        clock.observe((Utc::now() + TimeDelta::days(40)).timestamp_micros());
        assert_eq!(lag(&clock), 40 * 86_400);
        clock.observe((Utc::now() - TimeDelta::seconds(3)).timestamp_micros());
        assert_eq!(lag(&clock), -3);
    }
}
