//! The circuit breaker in front of Redis: after consecutive failed calls the limiter stops calling for a
//! cooldown, so that a dead Redis costs no request a timeout; then one call probes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tollgate_shared::metrics::RATELIMIT_BREAKER_OPEN;

/// Consecutive failures open it; after the cooldown one call probes; a success closes it.
pub struct Breaker {
    state: Mutex<BreakerState>,
    threshold: u32,
    cooldown: Duration,
}

#[derive(Debug, Clone, Copy)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else stays degraded until it returns, or until `until`: a probe whose call
    /// was never made (its request gave up waiting) reports nothing, and another may probe then.
    Probing {
        until: Instant,
    },
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker { state: Mutex::new(BreakerState::Closed { failures: 0 }), threshold: threshold.max(1), cooldown }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is a plain value that is always valid, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        matches!(*self.lock(), BreakerState::Closed { .. })
    }

    /// Whether this call may go to Redis.
    pub fn permit(&self) -> bool {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::Probing { until } if Instant::now() >= until => {
                *state = BreakerState::Probing { until: Instant::now() + self.cooldown };
                true
            }
            BreakerState::Open { .. } | BreakerState::Probing { .. } => false,
        }
    }

    pub fn success(&self) {
        let mut state = self.lock();
        if !matches!(*state, BreakerState::Closed { failures: 0 }) {
            if !matches!(*state, BreakerState::Closed { .. }) {
                tracing::info!("rate limiter: Redis answers again; circuit breaker closed");
                metrics::gauge!(RATELIMIT_BREAKER_OPEN).set(0.0);
            }
            *state = BreakerState::Closed { failures: 0 };
        }
    }

    pub fn failure(&self) {
        let mut state = self.lock();
        let open = match *state {
            BreakerState::Closed { failures } if failures + 1 < self.threshold => {
                *state = BreakerState::Closed { failures: failures + 1 };
                false
            }
            _ => true,
        };
        if open {
            if matches!(*state, BreakerState::Closed { .. }) {
                tracing::warn!(cooldown = ?self.cooldown, "rate limiter: circuit breaker open; Redis is not called");
            }
            metrics::gauge!(RATELIMIT_BREAKER_OPEN).set(1.0);
            *state = BreakerState::Open { until: Instant::now() + self.cooldown };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_probes_once_and_closes() {
        // A cooldown long next to a loaded machine's pauses between two lines of this test.
        let breaker = Breaker::new(2, Duration::from_millis(300));
        assert!(breaker.permit());
        breaker.failure();
        assert!(breaker.is_closed());
        breaker.failure();
        assert!(!breaker.permit());
        std::thread::sleep(Duration::from_millis(350));
        assert!(breaker.permit(), "one probe after the cooldown");
        assert!(!breaker.permit(), "only one");
        breaker.failure();
        assert!(!breaker.permit());
        std::thread::sleep(Duration::from_millis(350));
        assert!(breaker.permit(), "a probe that never reports");
        assert!(!breaker.permit());
        std::thread::sleep(Duration::from_millis(350));
        assert!(breaker.permit(), "lets another probe after the cooldown");
        breaker.success();
        assert!(breaker.is_closed() && breaker.permit());
    }
}
