//! The rolling-window counter: the arithmetic behind every rate limit, shared by the Redis script (which mirrors
//! it in Lua) and the in-process fallback limiter.
//!
//! A window of length `W` is split into [`BUCKETS`] buckets of width `w = W / BUCKETS`; a counter is at most
//! `BUCKETS + 2` (bucket index, count) pairs, whatever the traffic. At time `t` the count is the sum of every bucket
//! from `floor((t - W) / w)` to `floor(t / w)`: `BUCKETS + 1` buckets that together cover the whole rolling window
//! `[t - W, t]` and a little more. A request is admitted only if that sum plus its cost is at most the limit, so
//! every rolling window ending at an admission, and therefore every rolling window, holds at most `limit`
//! admitted units: the bound is exact. The price is that the counted span is `W + w`, so under steady
//! over-limit load about `BUCKETS / (BUCKETS + 1)` ≈ 99% of the limit is admitted per window.

use std::collections::VecDeque;

/// Buckets per window. 100 divides 1 000 000, so a window of whole seconds has buckets of whole microseconds; and
/// a counter holds at most 101 non-empty buckets (16 bytes each in Redis, see limit.lua).
pub const BUCKETS: i64 = 100;

/// The geometry of one window, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub length_us: i64,
    pub bucket_us: i64,
}

impl Window {
    pub fn seconds(seconds: u32) -> Window {
        let length_us = i64::from(seconds.max(1)) * 1_000_000;
        Window { length_us, bucket_us: length_us / BUCKETS }
    }

    fn bucket(self, now_us: i64) -> i64 {
        now_us.div_euclid(self.bucket_us)
    }

    /// The oldest bucket still counted at `now_us`.
    fn first_counted(self, now_us: i64) -> i64 {
        self.bucket(now_us) - BUCKETS
    }

    /// When bucket `b` stops being counted.
    fn exit_us(self, b: i64) -> i64 {
        (b + 1) * self.bucket_us + self.length_us
    }
}

/// What a counter says about one more request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// Units counted before this request.
    pub used: u64,
    pub fits: bool,
    /// If it fits: when the oldest counted unit leaves (`None` if nothing is counted). If not: the earliest time
    /// at which a request of this cost would fit (`None` if its cost exceeds the limit, so it never will).
    pub at_us: Option<i64>,
}

/// One counter's buckets, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Counter {
    buckets: VecDeque<(i64, u64)>,
}

impl Counter {
    /// Forgets buckets that no longer count at `now_us`, then says whether `cost` more fits under `limit`.
    pub fn check(&mut self, window: Window, now_us: i64, limit: u64, cost: u64) -> Check {
        let first = window.first_counted(now_us);
        while self.buckets.front().is_some_and(|(b, _)| *b < first) {
            self.buckets.pop_front();
        }
        let used: u64 = self.buckets.iter().map(|(_, c)| c).sum();
        if used + cost <= limit {
            let at_us = self.buckets.front().map(|(b, _)| window.exit_us(*b));
            return Check { used, fits: true, at_us };
        }
        Check { used, fits: false, at_us: retry_at(window, self.buckets.iter().copied(), used, limit, cost) }
    }

    /// Counts `cost` units at `now_us`.
    pub fn add(&mut self, window: Window, now_us: i64, cost: u64) {
        let b = window.bucket(now_us);
        match self.buckets.back_mut() {
            Some((last, count)) if *last == b => *count += cost,
            // Redis time can step back a little; such a unit is counted in the newest bucket, which only delays
            // its exit (the bound stays exact).
            Some((last, count)) if *last > b => *count += cost,
            _ => self.buckets.push_back((b, cost)),
        }
    }

    /// Whether nothing is counted any more at `now_us` (the counter can be dropped).
    pub fn is_idle(&self, window: Window, now_us: i64) -> bool {
        self.buckets.back().is_none_or(|(b, _)| *b < window.first_counted(now_us))
    }
}

/// The earliest time at which enough old buckets have left for `cost` more to fit.
fn retry_at(
    window: Window,
    buckets: impl Iterator<Item = (i64, u64)>,
    used: u64,
    limit: u64,
    cost: u64,
) -> Option<i64> {
    if cost > limit {
        return None;
    }
    let mut left = used;
    for (b, count) in buckets {
        left -= count;
        if left + cost <= limit {
            return Some(window.exit_us(b));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rolling window of length `w` over sorted `times` holds at most `limit` entries.
    fn max_in_any_window(times: &[i64], w: i64) -> usize {
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end] - times[start] > w {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    #[test]
    fn never_more_than_the_limit_in_any_rolling_window_and_about_98_percent_fill() {
        let window = Window::seconds(2);
        let limit = 100;
        let mut counter = Counter::default();
        let mut admitted = Vec::new();
        // Offered load: 3× the limit, at irregular intervals, for 20 windows.
        let mut now = 1_700_000_000_000_000_i64;
        let end = now + 20 * window.length_us;
        let start = now;
        let mut step = 0_i64;
        while now < end {
            let check = counter.check(window, now, limit, 1);
            if check.fits {
                counter.add(window, now, 1);
                admitted.push(now);
            }
            step += 1;
            now += 2_000_000 / 300 + (step * 7919) % 5_000 - 2_500;
        }
        assert!(max_in_any_window(&admitted, window.length_us) <= limit as usize);
        let steady: Vec<i64> = admitted.iter().copied().filter(|t| *t >= start + window.length_us).collect();
        let windows = (end - start - window.length_us) as f64 / window.length_us as f64;
        let fill = steady.len() as f64 / windows / limit as f64;
        assert!(fill >= 0.97, "fill {fill}");
    }

    #[test]
    fn costs_count_and_retry_is_when_enough_leaves() {
        let window = Window::seconds(100);
        let mut counter = Counter::default();
        let t0 = 100_000_000 * 10;
        assert!(counter.check(window, t0, 10, 4).fits);
        counter.add(window, t0, 4);
        let later = t0 + 5_000_000;
        assert!(counter.check(window, later, 10, 6).fits);
        counter.add(window, later, 6);
        let denied = counter.check(window, later, 10, 5);
        assert_eq!((denied.used, denied.fits), (10, false));
        // Both buckets must leave for 5 more to fit: the second one's exit.
        assert_eq!(denied.at_us, Some((later / 1_000_000 + 1) * 1_000_000 + 100_000_000));
        let small = counter.check(window, later, 10, 4);
        assert_eq!(small.at_us, Some((t0 / 1_000_000 + 1) * 1_000_000 + 100_000_000));
        assert_eq!(counter.check(window, later, 10, 11).at_us, None);
        let after = denied.at_us.expect("retry time");
        assert!(!counter.check(window, after - 1, 10, 5).fits);
        assert!(counter.check(window, after, 10, 5).fits);
        assert!(counter.is_idle(window, after));
    }
}
