//! Fault injection: delay or abort a configured share of requests, decided per request from
//! one random draw each so tests can feed fixed draws.

use std::time::Duration;

/// Configured faults: `(value, percentage 0..=100)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decision {
    /// Wait this long first (response flag `DI`).
    pub delay: Option<Duration>,
    /// Answer with this status instead of forwarding (response flag `FI`).
    pub abort: Option<u16>,
}

impl Config {
    /// Decides with draws `delay_draw`, `abort_draw` uniform in `[0, 100)`.
    pub fn decide(&self, delay_draw: f64, abort_draw: f64) -> Decision {
        Decision {
            delay: self
                .delay
                .and_then(|(d, pct)| (delay_draw < pct).then_some(d)),
            abort: self
                .abort
                .and_then(|(s, pct)| (abort_draw < pct).then_some(s)),
        }
    }

    /// True when nothing is configured (skips the random draws).
    pub fn is_empty(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        let c = Config {
            delay: Some((Duration::from_millis(5), 25.0)),
            abort: Some((503, 50.0)),
        };
        let cases = [
            (0.0, 0.0, true, true),
            (24.9, 49.9, true, true),
            (25.0, 50.0, false, false),
            (99.9, 10.0, false, true),
        ];
        for (d, a, want_delay, want_abort) in cases {
            let got = c.decide(d, a);
            assert_eq!(got.delay.is_some(), want_delay, "{d}");
            assert_eq!(got.abort.is_some(), want_abort, "{a}");
        }
        assert!(Config::default().is_empty());
    }
}
