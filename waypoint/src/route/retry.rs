//! Retries: which outcomes are retried, the back-off between attempts (exponential with full
//! jitter, so many clients retrying together spread out), and a retry budget per destination
//! service so a failing service is not hammered: concurrent retries stay within 20% of the
//! requests in flight to it, with a floor of 3 so light traffic can still retry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Retry settings of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Response codes retried. Connection failures and resets are always retried (nothing
    /// reached the application, or the attempt was cut).
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Base back-off.
    pub backoff: Duration,
}

/// How one attempt ended, as far as retries care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No connection to the endpoint (connect failure, refused tunnel).
    ConnectFailure,
    /// The connection or stream broke before a response.
    Reset,
}

impl RetryPolicy {
    /// Whether attempt number `attempt` (0 = first try) may be followed by another.
    pub fn should_retry(&self, outcome: Outcome, attempt: u32) -> bool {
        if attempt >= self.attempts {
            return false;
        }
        match outcome {
            Outcome::Status(code) => self.codes.contains(&code),
            Outcome::ConnectFailure | Outcome::Reset => true,
        }
    }

    /// Back-off before retry number `retry` (1-based): uniformly random in
    /// `[0, min(base × 2^(retry-1), 10 × base)]`, `jitter` in `[0, 1)`.
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let exp = 1u32 << retry.saturating_sub(1).min(10);
        let cap = self.backoff.saturating_mul(exp).min(self.backoff * 10);
        cap.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// The retry budget of one service.
#[derive(Debug, Default)]
pub struct Budget {
    active: AtomicUsize,
    retrying: AtomicUsize,
}

/// Share of active requests that may be retries at once.
pub const BUDGET_PERCENT: usize = 20;
/// Retries always allowed at once, whatever the traffic.
pub const BUDGET_MIN: usize = 3;

/// Counts a request as active while alive.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Budget>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one slot of the budget while a retry is in flight.
#[derive(Debug)]
pub struct RetryGuard(Arc<Budget>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Budget {
    /// Marks a request active.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// A retry slot, or `None` when the budget is spent.
    pub fn try_retry(self: &Arc<Self>) -> Option<RetryGuard> {
        let allowed = (self.active.load(Ordering::Relaxed) * BUDGET_PERCENT / 100).max(BUDGET_MIN);
        let mut current = self.retrying.load(Ordering::Relaxed);
        loop {
            if current >= allowed {
                return None;
            }
            match self.retrying.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(RetryGuard(self.clone())),
                Err(now) => current = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let p = RetryPolicy {
            codes: vec![503],
            attempts: 2,
            backoff: Duration::from_millis(100),
        };
        let cases = [
            (Outcome::Status(503), 0, true),
            (Outcome::Status(503), 1, true),
            (Outcome::Status(503), 2, false),
            (Outcome::Status(500), 0, false),
            (Outcome::Status(200), 0, false),
            (Outcome::ConnectFailure, 0, true),
            (Outcome::Reset, 1, true),
        ];
        for (outcome, attempt, want) in cases {
            assert_eq!(
                p.should_retry(outcome, attempt),
                want,
                "{outcome:?} {attempt}"
            );
        }
        assert_eq!(p.backoff(1, 0.999).as_millis(), 99);
        assert_eq!(p.backoff(3, 0.5).as_millis(), 200);
        assert_eq!(p.backoff(20, 1.0).as_millis(), 1000);
    }

    #[test]
    fn budget_floor_and_share() {
        let b = Arc::new(Budget::default());
        let active: Vec<_> = (0..30).map(|_| b.enter()).collect();
        // 20% of 30 = 6.
        let held: Vec<_> = (0..6)
            .map(|_| b.try_retry().expect("within budget"))
            .collect();
        assert!(b.try_retry().is_none());
        drop(held);
        drop(active);
        let held: Vec<_> = (0..3).map(|_| b.try_retry().expect("floor")).collect();
        assert!(b.try_retry().is_none());
        drop(held);
    }
}
