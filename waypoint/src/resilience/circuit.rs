//! Circuit breaking: bounds on what one service may have in flight through this waypoint.
//!
//! The waypoint gives each in-flight HTTP/1 request its own upstream connection (HTTP/2 and
//! gRPC multiplex, but count the same way so the limit means one thing), so
//! `maxConnections` bounds requests in flight to the service; up to `maxPendingRequests`
//! more wait for a slot (1024 when unset, Envoy's default); beyond that the request is
//! refused at once with 503 and response flag `UO` (upstream overflow).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pending requests allowed when `maxPendingRequests` is unset.
pub const DEFAULT_MAX_PENDING: u32 = 1024;

/// Configured limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    /// Requests per upstream HTTP/1 connection before it is closed.
    pub max_requests_per_connection: Option<u32>,
}

/// The request was refused: too many in flight and too many waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CircuitError {
    /// `maxConnections` requests are in flight and `maxPendingRequests` more already wait.
    #[error("upstream overflow: {in_flight} in flight, {pending} pending")]
    Overflow { in_flight: usize, pending: usize },
}

/// Runtime state for one service.
#[derive(Debug)]
pub struct Breaker {
    slots: Option<Arc<Semaphore>>,
    max_connections: usize,
    max_pending: usize,
    pending: AtomicUsize,
}

/// Holds an in-flight slot.
#[derive(Debug)]
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    /// A breaker for `limits`.
    pub fn new(limits: Option<&Limits>) -> Self {
        let max_connections = limits.and_then(|l| l.max_connections);
        Breaker {
            slots: max_connections.map(|n| Arc::new(Semaphore::new(n as usize))),
            max_connections: max_connections.unwrap_or(u32::MAX) as usize,
            max_pending: limits
                .and_then(|l| l.max_pending_requests)
                .unwrap_or(DEFAULT_MAX_PENDING) as usize,
            pending: AtomicUsize::new(0),
        }
    }

    /// A slot, waiting if allowed; refused when the queue is full too.
    pub async fn acquire(&self) -> Result<Slot, CircuitError> {
        let Some(slots) = &self.slots else {
            return Ok(Slot { _permit: None });
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(Slot {
                _permit: Some(permit),
            });
        }
        let pending = self.pending.fetch_add(1, Ordering::AcqRel);
        let _guard = PendingGuard(&self.pending);
        if pending >= self.max_pending {
            return Err(CircuitError::Overflow {
                in_flight: self.max_connections,
                pending,
            });
        }
        match slots.clone().acquire_owned().await {
            Ok(permit) => Ok(Slot {
                _permit: Some(permit),
            }),
            // The semaphore is never closed; treat it as an overflow rather than panic.
            Err(_) => Err(CircuitError::Overflow {
                in_flight: self.max_connections,
                pending,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_after_pending() {
        let b = Arc::new(Breaker::new(Some(&Limits {
            max_connections: Some(1),
            max_pending_requests: Some(1),
            max_requests_per_connection: None,
        })));
        let first = b.acquire().await.expect("slot");
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire().await.map(|_| ()) });
        tokio::task::yield_now().await;
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            b.acquire().await,
            Err(CircuitError::Overflow { .. })
        ));
        drop(first);
        assert!(waiter.await.expect("join").is_ok());
    }

    #[tokio::test]
    async fn unlimited_without_limits() {
        let b = Breaker::new(None);
        let slots: Vec<_> = futures::future::join_all((0..100).map(|_| b.acquire())).await;
        assert!(slots.iter().all(|s| s.is_ok()));
    }
}
