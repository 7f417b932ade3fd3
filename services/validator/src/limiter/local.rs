//! The fallback limiter for when Redis cannot decide (the `local` failure policy): the script's arithmetic on this
//! process's own counters.

use std::collections::HashMap;
use std::sync::Mutex;

use super::plan::{Plan, Subject, WindowLimit};
use super::verdict::{decide_from, WindowReply};
use super::window::{Counter, Window};
use super::Decision;

/// Counters kept before idle ones are swept.
const SWEEP_AT: usize = 100_000;

/// This process's counters, one per subject and window length.
#[derive(Default)]
pub struct LocalLimiter {
    /// Each counter with its window.
    counters: Mutex<HashMap<(Subject, u32), (Window, Counter)>>,
}

impl LocalLimiter {
    /// Decides `cost` more units against every window of `windows`, all or nothing.
    pub fn decide(&self, windows: &[WindowLimit], cost: u32, now: i64) -> Decision {
        let cost = u64::from(cost);
        // A poisoned lock only means another request panicked mid-update; the counters are still usable.
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        if counters.len() >= SWEEP_AT {
            counters.retain(|_, (window, counter)| !counter.is_idle(*window, now));
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
