//! Bounded logging for events an attacker can cause at line rate (refused connections, failed
//! handshakes, failed accepts): at most one line per cause per interval, carrying how many
//! events of that cause went unlogged since the previous line.
//!
//! A counter metric next to each call site keeps the exact figure; the log only has to tell an
//! operator that something is happening and why, without letting a flood fill the node's disk.
//! Causes are `&'static str`, so the set of keys is fixed by the code and cannot be grown by a
//! peer (never key by address or identity).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a cause may log by default: often enough to see an attack start and stop,
/// rarely enough that a flood costs a few lines a minute per cause.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Per-cause rate limiter for log lines. Cheap to share (`Arc` it); the lock is held for a
/// hash lookup only.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    causes: Mutex<HashMap<&'static str, Slot>>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    last: Instant,
    suppressed: u64,
}

impl LogThrottle {
    /// A throttle letting each cause log once per `interval`.
    pub fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            causes: Mutex::new(HashMap::new()),
        }
    }

    /// Records one event of `cause`. `Some(suppressed)` means: write a line now, and say that
    /// `suppressed` earlier events of this cause were not logged; `None`: stay quiet. The first
    /// event of a cause is always logged at once.
    pub fn admit(&self, cause: &'static str) -> Option<u64> {
        self.admit_at(cause, Instant::now())
    }

    /// [`LogThrottle::admit`] at a given time (tests).
    pub fn admit_at(&self, cause: &'static str, now: Instant) -> Option<u64> {
        // A panic while holding this lock cannot leave a slot half-written.
        let mut causes = self.causes.lock().unwrap_or_else(PoisonError::into_inner);
        match causes.get_mut(cause) {
            None => {
                causes.insert(
                    cause,
                    Slot {
                        last: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
            Some(slot) if now.saturating_duration_since(slot.last) >= self.interval => {
                let suppressed = slot.suppressed;
                *slot = Slot {
                    last: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            Some(slot) => {
                slot.suppressed += 1;
                None
            }
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_cause_with_the_count_in_between() {
        let t = LogThrottle::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(t.admit_at("a", at(0)), Some(0), "first event logs at once");
        for _ in 0..1000 {
            assert_eq!(t.admit_at("a", at(1)), None);
        }
        // Another cause has its own budget.
        assert_eq!(t.admit_at("b", at(1)), Some(0));
        assert_eq!(t.admit_at("a", at(4)), None);
        assert_eq!(
            t.admit_at("a", at(5)),
            Some(1001),
            "1001 events went unlogged"
        );
        assert_eq!(t.admit_at("a", at(6)), None);
        assert_eq!(t.admit_at("a", at(20)), Some(1));
        assert_eq!(t.admit_at("b", at(20)), Some(0));
    }
}
