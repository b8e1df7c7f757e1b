//! Local rate limit: a token bucket per service (and per source identity when asked), refilled
//! lazily from elapsed time so idle buckets cost nothing. A refused request gets 429 with
//! `retry-after` (seconds until the next fill, at least 1) and response flag `RL`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bucket settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    pub max_tokens: u32,
    pub per_source_identity: bool,
}

/// Most buckets kept at once when keyed by identity; beyond it, full buckets are dropped
/// (they carry no state), so an identity churn cannot grow memory without bound.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    last_fill: Instant,
}

/// The limiter of one service.
#[derive(Debug)]
pub struct Limiter {
    config: Config,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Outcome of asking for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Refused; a token is available again after this long.
    Limited {
        retry_after: Duration,
    },
}

impl Limiter {
    pub fn new(config: Config) -> Self {
        Limiter {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `source` (ignored unless per-identity) at `now`.
    pub fn check(&self, source: &str, now: Instant) -> Decision {
        let key = if self.config.per_source_identity {
            source
        } else {
            ""
        };
        let c = &self.config;
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| b.tokens < c.max_tokens);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: c.max_tokens,
            last_fill: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last_fill);
        let fills = (elapsed.as_nanos() / c.fill_interval.as_nanos().max(1)) as u64;
        if fills > 0 {
            let added = fills.saturating_mul(u64::from(c.tokens_per_fill));
            bucket.tokens = (u64::from(bucket.tokens) + added).min(u64::from(c.max_tokens)) as u32;
            bucket.last_fill += c.fill_interval * (fills.min(u64::from(u32::MAX)) as u32);
        }
        if bucket.tokens > 0 {
            bucket.tokens -= 1;
            Decision::Allowed
        } else {
            Decision::Limited {
                retry_after: (bucket.last_fill + c.fill_interval).saturating_duration_since(now),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_refills() {
        let l = Limiter::new(Config {
            tokens_per_fill: 1,
            fill_interval: Duration::from_secs(1),
            max_tokens: 2,
            per_source_identity: true,
        });
        let t0 = Instant::now();
        assert_eq!(l.check("a", t0), Decision::Allowed);
        assert_eq!(l.check("a", t0), Decision::Allowed);
        assert_eq!(
            l.check("a", t0 + Duration::from_millis(400)),
            Decision::Limited {
                retry_after: Duration::from_millis(600)
            }
        );
        // Another identity has its own bucket.
        assert_eq!(l.check("b", t0), Decision::Allowed);
        assert_eq!(l.check("a", t0 + Duration::from_secs(1)), Decision::Allowed);
        assert!(matches!(
            l.check("a", t0 + Duration::from_secs(1)),
            Decision::Limited { .. }
        ));
        // Long idle: refilled to max, not beyond.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(l.check("a", later), Decision::Allowed);
        assert_eq!(l.check("a", later), Decision::Allowed);
        assert!(matches!(l.check("a", later), Decision::Limited { .. }));
    }
}
