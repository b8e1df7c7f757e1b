//! Leader election: every controller replica serves discovery and the CA, but only one, the
//! leader, writes (Kubernetes: the CA Secret, the trust-root ConfigMap, waypoint objects;
//! local mode: the node credentials and the leader record, see [`FileElector`]).
//!
//! - Kubernetes: a `coordination.k8s.io/v1` Lease ([`LeaseElector`]). Every `retry_period`
//!   each replica reads the Lease; the holder renews it (a replace carrying the
//!   resourceVersion it read, so of two concurrent writers one gets a 409 and stays a
//!   follower); a follower takes it over only after it has seen the same record, unchanged,
//!   for `leaseDurationSeconds` by its own clock (clocks of different nodes are never
//!   compared). A leader that could not renew for `renew_deadline` (shorter than the lease
//!   duration) steps down before anyone may take over, so two leaders never write at once.
//!   On a clean shutdown the leader releases the Lease, so the next one takes over at its
//!   next try instead of after the lease duration.
//! - Local mode: an exclusive `flock` on `<state-dir>/leader.lock`, held by a thread that
//!   blocks on it ([`FileElector`]). The kernel drops the lock when its holder dies (even by
//!   SIGKILL), so the next replica is leader at once.
//!
//! Both report through a [`Leadership`] handle: a `watch` of "am I the leader", which
//! [`while_leader`] turns into a task that runs only while it is true and is aborted the
//! moment it turns false.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// The Lease the replicas compete for, in the controller's namespace.
pub const LEASE_NAME: &str = "ambit-controller";
/// The local mode's lock file, under the state directory.
pub const LOCK_FILE: &str = "leader.lock";
/// The local mode's leader record (`<identity> <pid>`), under the state directory.
pub const RECORD_FILE: &str = "leader";

/// Why an election step failed (logged; the elector tries again at its next period).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// An API call on the Lease failed.
    #[error("{what} Lease {namespace}/{LEASE_NAME}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// The Lease's namespace.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The lock file could not be opened.
    #[error("opening the leader lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The leader record could not be written.
    #[error("writing the leader record {path}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Timing of a Lease election (client-go's names and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// This replica's name in the Lease (the pod name on Kubernetes).
    pub identity: String,
    /// How long a follower waits, after the Lease last changed, before taking it over.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal; must be shorter
    /// than `lease_duration` so it stops before a follower may start.
    pub renew_deadline: Duration,
    /// How often every replica tries to acquire or renew.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// The defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(identity: &str) -> Self {
        ElectionConfig {
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether this replica leads, and a gauge of it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    gauge: Gauge,
}

impl Leadership {
    /// A handle that is always the leader (a controller that does not elect).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        // The receiver outlives the sender; its value stays true.
        drop(tx);
        let gauge = Gauge::default();
        gauge.set(1);
        Leadership { rx, gauge }
    }

    fn channel() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (
            tx,
            Leadership {
                rx,
                gauge: Gauge::default(),
            },
        )
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until this replica leads (forever if the elector stopped while following).
    pub async fn acquired(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|l| *l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until this replica no longer leads (forever if it always will).
    pub async fn lost(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|l| !*l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Registers `ambit_controller_leader` (1 on the leader, 0 elsewhere).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ambit_controller_leader",
            "Whether this controller replica is the leader (does the writes)",
            self.gauge.clone(),
        );
    }

    fn set(&self, tx: &watch::Sender<bool>, leader: bool) {
        self.gauge.set(i64::from(leader));
        tx.send_if_modified(|l| std::mem::replace(l, leader) != leader);
    }
}

/// Runs `task()` while `leadership` holds: started each time leadership is acquired,
/// aborted the moment it is lost (an in-flight write is dropped with it), and aborted too
/// when the returned future is dropped. Runs until then.
pub async fn while_leader<F, Fut>(leadership: Leadership, what: &'static str, task: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    /// Aborts the term's task when dropped: at the end of a term, or with this future.
    struct Term(tokio::task::JoinHandle<()>);
    impl Drop for Term {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    loop {
        leadership.acquired().await;
        tracing::info!(%what, "leading: starting");
        let mut term = Term(tokio::spawn(task()));
        tokio::select! {
            () = leadership.lost() => {
                tracing::warn!(%what, "leadership lost: stopped");
            }
            _ = &mut term.0 => {
                // Finished on its own: wait for the next term before running it again.
                leadership.lost().await;
            }
        }
        drop(term);
    }
}

/// The Kubernetes elector over the Lease [`LEASE_NAME`].
pub struct LeaseElector {
    api: Api<Lease>,
    namespace: String,
    config: ElectionConfig,
    /// The Lease's resourceVersion when we last saw it change, and when that was.
    observed: Option<(String, Instant)>,
}

impl LeaseElector {
    /// An elector for the Lease in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, config: ElectionConfig) -> Self {
        LeaseElector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            config,
            observed: None,
        }
    }

    /// Starts electing; the returned task releases the Lease when `shutdown` turns true
    /// (if it leads), then ends.
    pub fn spawn(
        mut self,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (tx, leadership) = Leadership::channel();
        let handle = leadership.clone();
        let task = tokio::spawn(async move {
            let mut last_renewal: Option<Instant> = None;
            loop {
                match self.try_acquire_or_renew().await {
                    Ok(true) => {
                        if !handle.is_leader() {
                            tracing::info!(identity = %self.config.identity, "acquired the controller Lease");
                        }
                        last_renewal = Some(Instant::now());
                        handle.set(&tx, true);
                    }
                    Ok(false) => {
                        if handle.is_leader() {
                            tracing::warn!(identity = %self.config.identity, "the controller Lease is held by another replica");
                        }
                        last_renewal = None;
                        handle.set(&tx, false);
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::model::error_chain(&e), "leader election");
                        if last_renewal.is_some_and(|t| t.elapsed() >= self.config.renew_deadline) {
                            tracing::warn!(deadline = ?self.config.renew_deadline, "could not renew the controller Lease in time: stepping down");
                            last_renewal = None;
                            handle.set(&tx, false);
                        }
                    }
                }
                let closing = async {
                    // The guard `wait_for` returns must not be held across the release.
                    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
                };
                tokio::select! {
                    () = tokio::time::sleep(self.config.retry_period) => {}
                    () = closing => {
                        if handle.is_leader() {
                            handle.set(&tx, false);
                            if let Err(e) = self.release().await {
                                tracing::warn!(error = %crate::model::error_chain(&e), "releasing the controller Lease");
                            }
                        }
                        return;
                    }
                }
            }
        });
        (leadership, task)
    }

    fn api_err(&self, what: &'static str) -> impl FnOnce(kube::Error) -> LeaderError + '_ {
        move |source| LeaderError::Api {
            what,
            namespace: self.namespace.clone(),
            source,
        }
    }

    /// One round: true when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let now = MicroTime(Timestamp::now());
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self
            .api
            .get_opt(LEASE_NAME)
            .await
            .map_err(self.api_err("reading"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.to_string()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another replica created it first: it leads.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(self.api_err("creating")(e)),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(v, _)| *v != version) {
            self.observed = Some((version, Instant::now()));
        }
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.config.identity.as_str());
        let lease_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.lease_duration, Duration::from_secs);
        let unchanged_for = self
            .observed
            .as_ref()
            .map_or(Duration::ZERO, |(_, t)| t.elapsed());
        if holder.is_some() && !ours && unchanged_for < lease_duration {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration),
            acquire_time: if ours {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..spec
        });
        // The resourceVersion we read stays in the body: if anyone wrote in between, the
        // API server refuses with 409 and we are not the leader this round.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                if let Some(v) = written.metadata.resource_version {
                    self.observed = Some((v, Instant::now()));
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(self.api_err("renewing")(e)),
        }
    }

    /// Gives the Lease up (holder cleared, 1 s duration) so a follower takes over at its
    /// next try.
    async fn release(&mut self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(LEASE_NAME)
            .await
            .map_err(self.api_err("reading"))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
            .map_err(self.api_err("releasing"))?;
        tracing::info!(identity = %self.config.identity, "released the controller Lease");
        Ok(())
    }
}

/// The local mode's elector: whoever holds an exclusive `flock` on
/// `<state-dir>/leader.lock` leads. The leader writes the record `<state-dir>/leader`
/// (`<identity> <pid>`) once its writes of the start (the generated root, the node
/// credentials) are done: it tells a follower starting beside it that it may load them, and
/// names the leader for operators and tests.
pub struct FileElector {
    state_dir: PathBuf,
    identity: String,
}

impl FileElector {
    /// An elector over `state_dir`, naming itself `identity` in the record.
    pub fn new(state_dir: &Path, identity: &str) -> Self {
        FileElector {
            state_dir: state_dir.to_path_buf(),
            identity: identity.to_string(),
        }
    }

    /// Takes the lock now if it is free; else starts a thread that blocks on it, and the
    /// returned handle turns true when that thread gets it. The lock is held until the
    /// process exits. The leader's writes (the record: [`Self::write_record`]) are the
    /// caller's, run while the handle says so.
    pub fn spawn(self) -> Result<Leadership, LeaderError> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.state_dir.join(LOCK_FILE);
        let err = |source| LeaderError::Lock {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.state_dir).map_err(err)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        let (tx, leadership) = Leadership::channel();
        let handle = leadership.clone();
        let identity = self.identity.clone();
        let lead = move |lock: Flock<File>| {
            tracing::info!(%identity, "acquired the leader lock");
            handle.set(&tx, true);
            // Held (and the sender kept, so the handle stays true) until the process exits.
            std::mem::forget((lock, tx));
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lead(lock),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                tracing::info!(lock = %path.display(), "another controller leads; following");
                // A plain thread, not the runtime's blocking pool: it may block until the
                // process exits, and the runtime must not wait for it at shutdown.
                let waiting = path.clone();
                std::thread::Builder::new()
                    .name("leader-lock".into())
                    .spawn(move || match Flock::lock(file, FlockArg::LockExclusive) {
                        Ok(lock) => lead(lock),
                        Err((_, e)) => {
                            tracing::error!(error = %e, lock = %waiting.display(), "waiting for the leader lock failed; staying a follower")
                        }
                    })
                    .map_err(err)?;
            }
            Err((_, e)) => return Err(err(std::io::Error::from(e))),
        }
        Ok(leadership)
    }

    /// Writes the leader record `<state_dir>/leader` (`<identity> <pid>`), atomically.
    pub fn write_record(state_dir: &Path, identity: &str) -> Result<(), LeaderError> {
        let record = state_dir.join(RECORD_FILE);
        let line = format!("{identity} {}\n", std::process::id());
        ambit_runtime::fs::write_atomic(&record, line.as_bytes(), 0o644).map_err(|source| {
            LeaderError::Record {
                path: record.clone(),
                source,
            }
        })
    }

    /// The leader named by the record under `state_dir`, if that process is alive:
    /// `(identity, pid)`.
    pub fn current(state_dir: &Path) -> Option<(String, u32)> {
        let text = std::fs::read_to_string(state_dir.join(RECORD_FILE)).ok()?;
        let (identity, pid) = text.trim().rsplit_once(' ')?;
        let pid: u32 = pid.parse().ok()?;
        let alive =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?), None)
                .is_ok();
        alive.then(|| (identity.to_string(), pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn while_leader_runs_the_task_only_during_a_term() {
        let (tx, leadership) = Leadership::channel();
        // Each run hands the test a receiver that fails when the run is dropped (aborted).
        let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let runner = tokio::spawn(while_leader(leadership.clone(), "test", move || {
            let runs_tx = runs_tx.clone();
            async move {
                let (alive, watched) = tokio::sync::oneshot::channel::<()>();
                let _ = runs_tx.send(watched);
                std::future::pending::<()>().await;
                drop(alive);
            }
        }));
        tokio::task::yield_now().await;
        assert!(runs.try_recv().is_err(), "ran without leadership");
        leadership.set(&tx, true);
        let first = runs.recv().await.unwrap();
        leadership.set(&tx, false);
        assert!(first.await.is_err(), "the run outlived its term");
        leadership.set(&tx, true);
        let second = runs.recv().await.unwrap();
        runner.abort();
        let _ = runner.await;
        assert!(second.await.is_err());
    }

    #[test]
    fn the_file_lock_has_one_holder_and_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let first = FileElector::new(dir.path(), "one").spawn().unwrap();
        assert!(first.is_leader());
        FileElector::write_record(dir.path(), "one").unwrap();
        assert_eq!(
            FileElector::current(dir.path()),
            Some(("one".to_string(), std::process::id()))
        );
        // flock locks belong to the open file description: a second open in this process
        // conflicts like another process would.
        let second = FileElector::new(dir.path(), "two").spawn().unwrap();
        assert!(!second.is_leader());
    }
}
