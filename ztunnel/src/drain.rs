//! Graceful drain as a building block: one [`DrainTrigger`] and any number of cloneable
//! [`DrainWatcher`]s.
//!
//! Every server holds a watcher: when drain starts it stops accepting, and every open
//! connection it spawned (each holding a clone of the watcher) gets until the drain
//! deadline to finish on its own, after which [`DrainWatcher::run`] drops it. The
//! trigger's [`DrainTrigger::drain_and_wait`] resolves as soon as every watcher has been
//! released, or at the deadline, whichever comes first, so a process that has nothing
//! in flight exits at once and a stuck connection cannot hold a rollout hostage.
//!
//! Deciding *when* to drain (SIGTERM, `/quitquitquit`) is the binary's business; this
//! module offers [`signal_handler`] and [`ShutdownRequest`] to wire those up.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long open connections get to finish once drain starts, unless configured.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Why a drained piece of work did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    /// Drain started and the work was still running at the deadline, so it was dropped.
    #[error("dropped at the drain deadline")]
    DeadlineExceeded,
}

/// How [`DrainTrigger::drain_and_wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every watcher was released before the deadline.
    Complete,
    /// The deadline passed with this many watchers still held.
    DeadlineExceeded {
        /// Watchers (servers or connections) still alive at the deadline.
        remaining: usize,
    },
}

/// Makes a trigger and the first watcher; clone the watcher for every server and
/// connection that must be waited for.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (state_tx, state_rx) = watch::channel(None);
    // Nothing is ever sent on this channel: the trigger only waits for every sender (one
    // per watcher) to be dropped, which is how it learns that everybody is done.
    let (release_tx, release_rx) = mpsc::channel(1);
    let trigger = DrainTrigger {
        state: state_tx,
        released: release_rx,
        weak: release_tx.downgrade(),
    };
    let watcher = DrainWatcher {
        state: state_rx,
        _release: release_tx,
    };
    (trigger, watcher)
}

/// Starts the drain. Owned by whoever decides when the process stops (main).
#[derive(Debug)]
pub struct DrainTrigger {
    /// `None` while serving; `Some(deadline)` once draining.
    state: watch::Sender<Option<Instant>>,
    released: mpsc::Receiver<std::convert::Infallible>,
    weak: mpsc::WeakSender<std::convert::Infallible>,
}

impl DrainTrigger {
    /// A new watcher, or `None` once every watcher is gone (nothing left to drain into).
    pub fn watcher(&self) -> Option<DrainWatcher> {
        Some(DrainWatcher {
            state: self.state.subscribe(),
            _release: self.weak.upgrade()?,
        })
    }

    /// Whether drain has started.
    pub fn is_draining(&self) -> bool {
        self.state.borrow().is_some()
    }

    /// Watchers currently alive (servers and connections that have not finished).
    pub fn watchers(&self) -> usize {
        self.weak.strong_count()
    }

    /// Starts draining: servers stop accepting, connections get `deadline` to finish.
    /// Resolves when every watcher is released or when the deadline passes.
    pub async fn drain_and_wait(mut self, deadline: Duration) -> DrainOutcome {
        let at = Instant::now() + deadline;
        self.state.send_replace(Some(at));
        tracing::info!(
            watchers = self.watchers(),
            deadline_ms = deadline.as_millis() as u64,
            "drain started"
        );
        // `recv` yields `None` once every sender (watcher) has been dropped.
        match tokio::time::timeout_at(at, self.released.recv()).await {
            Ok(_) => {
                tracing::info!("drain complete");
                DrainOutcome::Complete
            }
            Err(_) => {
                let remaining = self.watchers();
                tracing::warn!(remaining, "drain deadline passed with work still open");
                DrainOutcome::DeadlineExceeded { remaining }
            }
        }
    }
}

/// Told when drain starts; while any clone is alive, the trigger keeps waiting (up to
/// its deadline).
#[derive(Debug, Clone)]
pub struct DrainWatcher {
    state: watch::Receiver<Option<Instant>>,
    _release: mpsc::Sender<std::convert::Infallible>,
}

impl DrainWatcher {
    /// Whether drain has started.
    pub fn is_draining(&self) -> bool {
        self.state.borrow().is_some()
    }

    /// Resolves when drain starts, with the deadline by which work must be done.
    pub async fn signaled(&self) -> Instant {
        let mut state = self.state.clone();
        let signaled = state.wait_for(Option::is_some).await.map(|at| *at);
        match signaled {
            Ok(at) => at.unwrap_or_else(Instant::now),
            // The trigger was dropped without draining: the process is going away, so
            // treat it as a drain with no time left rather than waiting forever.
            Err(_) => Instant::now(),
        }
    }

    /// Runs `work` while holding this watcher: it runs to completion unless drain
    /// starts and it is still running at the drain deadline, in which case it is
    /// dropped (closing whatever sockets it owns).
    pub async fn run<F: Future>(self, work: F) -> Result<F::Output, DrainError> {
        let deadline = async {
            let at = self.signaled().await;
            tokio::time::sleep_until(at).await;
        };
        tokio::select! {
            out = work => Ok(out),
            () = deadline => Err(DrainError::DeadlineExceeded),
        }
    }
}

/// A request to shut down from inside the process (the admin `/quitquitquit` endpoint),
/// for main to act on like a signal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownRequest {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl Default for ShutdownRequest {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownRequest {
    pub fn new() -> Self {
        ShutdownRequest {
            tx: std::sync::Arc::new(watch::channel(false).0),
        }
    }

    /// Asks for shutdown; idempotent.
    pub fn request(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once shutdown has been requested.
    pub async fn requested(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: what Kubernetes sends on pod deletion.
    Terminate,
    /// SIGINT: Ctrl-C in a terminal.
    Interrupt,
}

/// Resolves at the first SIGTERM or SIGINT. If a handler cannot be installed (no signal
/// support), that signal is simply never reported.
pub async fn signal_handler() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
        match s {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot install signal handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = wait(term) => Signal::Terminate,
        () = wait(int) => Signal::Interrupt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn released_watchers_end_drain_promptly() {
        let (trigger, watcher) = channel();
        let server = tokio::spawn({
            let w = watcher.clone();
            async move {
                w.signaled().await;
                // A server that stops accepting and finishes a little later.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let conn = tokio::spawn(
            watcher
                .clone()
                .run(tokio::time::sleep(Duration::from_secs(1))),
        );
        drop(watcher);
        let start = Instant::now();
        let outcome = trigger.drain_and_wait(Duration::from_secs(5)).await;
        assert_eq!(outcome, DrainOutcome::Complete);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        server.await.expect("server");
        assert_eq!(conn.await.expect("conn"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_work_is_dropped_at_the_deadline() {
        let (trigger, watcher) = channel();
        let stuck = tokio::spawn(watcher.clone().run(std::future::pending::<()>()));
        // A watcher that is never released (a leaked handle) does not hold drain past
        // its deadline either.
        let leaked = watcher.clone();
        drop(watcher);
        let start = Instant::now();
        let outcome = trigger.drain_and_wait(Duration::from_secs(5)).await;
        // The leaked watcher is certainly still held; the stuck one is dropped at the
        // same instant, so it may or may not be counted.
        assert!(
            matches!(outcome, DrainOutcome::DeadlineExceeded { remaining } if remaining >= 1),
            "{outcome:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(
            stuck.await.expect("join"),
            Err(DrainError::DeadlineExceeded)
        );
        drop(leaked);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_open_returns_at_once() {
        let (trigger, watcher) = channel();
        assert!(!watcher.is_draining());
        let w = trigger.watcher().expect("alive");
        drop((watcher, w));
        assert!(trigger.watcher().is_none());
        let start = Instant::now();
        assert_eq!(
            trigger.drain_and_wait(DEFAULT_DRAIN_DEADLINE).await,
            DrainOutcome::Complete
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn shutdown_request_wakes_waiters() {
        let req = ShutdownRequest::new();
        let waiter = tokio::spawn({
            let r = req.clone();
            async move { r.requested().await }
        });
        assert!(!req.is_requested());
        req.request();
        waiter.await.expect("join");
        assert!(req.is_requested());
    }
}
