//! The fallback limiter for when Redis cannot decide (the `local` failure policy): the script's arithmetic on this
//! process's own counters.

use std::collections::HashMap;
use std::sync::Mutex;

use super::plan::{Plan, Subject, WindowLimit};
use super::verdict::{decide_from, WindowReply};
use super::window::{Counter, Window};
use super::Decision;

/// Counters kept before idle ones are first swept.
const SWEEP_AT: usize = 100_000;

/// This process's counters, one per subject and window length.
#[derive(Default)]
pub struct LocalLimiter {
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    /// Each counter with its window.
    by_subject: HashMap<(Subject, u32), (Window, Counter)>,
    /// How many counters the next sweep waits for (0: `SWEEP_AT`).
    sweep_at: usize,
}

impl LocalLimiter {
    /// Decides `cost` more units against every window of `windows`, all or nothing.
    pub fn decide(&self, windows: &[WindowLimit], cost: u32, now: i64) -> Decision {
        let cost = u64::from(cost);
        // A poisoned lock only means another request panicked mid-update; the counters are still usable.
        let Counters { by_subject: counters, sweep_at } = &mut *self.counters.lock().unwrap_or_else(|e| e.into_inner());
        if counters.len() >= (*sweep_at).max(SWEEP_AT) {
            counters.retain(|_, (window, counter)| !counter.is_idle(*window, now));
            // The next sweep waits until the map has doubled: with that many counters still in their windows, a
            // sweep at every decision would make each one scan them all.
            *sweep_at = 2 * counters.len();
        }
        let mut checks = Vec::with_capacity(windows.len());
        for w in windows {
            let geometry = Window::seconds(w.seconds);
            let (_, counter) = counters.entry((w.subject, w.seconds)).or_insert_with(|| (geometry, Counter::default()));
            checks.push(counter.check(geometry, now, w.limit, cost));
        }
        let replies: Vec<WindowReply> =
            checks.iter().map(|c| WindowReply { used: c.used, fits: c.fits, at_us: c.at_us }).collect();
        let plan = Plan { windows: windows.to_vec(), quota: None };
        let decision = decide_from(&plan, cost, now, &replies, None);
        if matches!(decision, Decision::Allowed { .. }) {
            for (w, check) in windows.iter().zip(&checks) {
                if check.fits {
                    if let Some((geometry, counter)) = counters.get_mut(&(w.subject, w.seconds)) {
                        counter.add(*geometry, now, cost);
                    }
                }
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn one_per_key(key: u128) -> [WindowLimit; 1] {
        [WindowLimit { subject: Subject::Key(Uuid::from_u128(key)), limit: 10, seconds: 60, shadow: false }]
    }

    fn counters(limiter: &LocalLimiter) -> (usize, usize) {
        let counters = limiter.counters.lock().expect("lock");
        (counters.by_subject.len(), counters.sweep_at)
    }

    #[test]
    fn counters_in_their_window_are_swept_once_per_doubling_and_idle_ones_go() {
        let limiter = LocalLimiter::default();
        let now = 1_800_000_000_000_000;
        let count = SWEEP_AT as u128;
        for key in 0..count {
            assert!(matches!(limiter.decide(&one_per_key(key), 1, now), Decision::Allowed { .. }));
        }
        // All still in their window: one sweep keeps them, and the next waits for twice as many.
        limiter.decide(&one_per_key(count), 1, now + 1);
        assert_eq!(counters(&limiter), (SWEEP_AT + 1, 2 * SWEEP_AT));
        // Counted on: a kept counter still holds its request.
        let used = |decision| match decision {
            Decision::Allowed { usage: Some(usage), .. } => usage.used,
            other => panic!("{other:?}"),
        };
        assert_eq!(used(limiter.decide(&one_per_key(0), 1, now + 2)), 2);
        // Two windows later every counter is idle: the sweep due at 2 × SWEEP_AT removes them all.
        let later = now + 120_000_000;
        for key in count + 1..2 * count {
            limiter.decide(&one_per_key(key), 1, later);
        }
        assert_eq!(counters(&limiter).0, 2 * SWEEP_AT);
        limiter.decide(&one_per_key(2 * count), 1, later);
        assert_eq!(counters(&limiter), (SWEEP_AT, 2 * (SWEEP_AT - 1)), "only the counters of `later` are kept");
    }
}
