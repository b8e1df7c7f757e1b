//! The per-node pod manager: keeps "pods captured and proxied" equal to "this node's workloads
//! that are in the mesh", as the state changes.
//!
//! One task watches the store's local-workloads channel (the store writer only flips a
//! `watch`, so it is never blocked by this) and reconciles:
//!
//! - a workload on this node with protocol HBONE and an address, not yet running: ask the
//!   certificate manager for its identity (`ensure`, so the fetch starts now), capture the
//!   pod (`CaptureManager::enroll_with`; its IPv6 captured when the workload has an IPv6
//!   address, closed otherwise), start its three proxies on the listeners (per family);
//! - a running pod that left, or became un-enrolled (its namespace lost the label: protocol
//!   TCP), or changed address or identity, or gained or lost its IPv6 address: stop it. The capture rules go first (new
//!   connections flow straight to the app again), then the pod's listeners stop accepting and
//!   its open connections get the drain deadline, in the background; then the identity is
//!   released.
//!
//! Stopping ztunnel ([`Enrollment::shutdown`]) is not un-enrolling: the pods stay enrolled, so
//! their capture rules and kept certificates stay; only the listeners close and connections
//! drain. Until a ztunnel adopts them, the pods' connections are refused (fail closed). A pod
//! this ztunnel never managed to serve that then leaves the mesh has its rules removed too
//! (they may be an earlier ztunnel's).
//!
//! Enrolling is idempotent. A pod that fails to enroll (its namespace not there yet, iptables
//! failing) is logged with its name and the reason and retried with capped exponential
//! back-off, so the node converges without an operator.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::Identity;
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::capture::{self, CaptureManager, CapturedPod, InpodError, Ipv6Capture, RuleConfig};
use crate::cni::Hints;
use crate::drain::{self, DrainOutcome, DrainTrigger};
use crate::handover::Handover;
use crate::proxy::{self, PodProxy, Shared};
use crate::state::{LocalWorkloads, TunnelProtocol, Workload};
use crate::telemetry::error_chain;

/// Why a pod could not be enrolled (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Capturing the pod failed.
    #[error("cannot capture the pod")]
    Capture(#[source] InpodError),
    /// The capture's listeners were already taken (a bug: each capture serves once).
    #[error("the pod's capture listeners were already taken")]
    ListenersTaken,
}

/// Misses of a pod's network namespace logged at debug level before they warn: with the
/// default back-off (500 ms, doubling) the first four span 7.5 s.
const SANDBOX_GRACE_ATTEMPTS: u32 = 4;

impl EnrollError {
    /// True when the pod's network namespace was not found (yet).
    fn is_sandbox_not_yet_there(&self) -> bool {
        matches!(self, EnrollError::Capture(InpodError::Netns { .. }))
    }
}

/// How pods are captured.
#[derive(Debug, Clone)]
pub enum CaptureMode {
    /// In-pod: find each pod's namespace under the manager's directory.
    Node(Arc<CaptureManager>),
    /// Dedicated: ztunnel runs beside its one workload and captures its own namespace (its
    /// listeners inherited from, and registered for, other ztunnels through the hand-over).
    Dedicated(RuleConfig, Handover),
}

/// First and longest retry delays of a failed enrollment.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Where one local pod stands, for tests and the admin dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PodStatus {
    /// Captured; its proxies are serving.
    Enrolled { ip: IpAddr, identity: String },
    /// Enrolling failed; retried after back-off.
    Failed { reason: String, attempts: u32 },
}

/// The pods of this node by uid.
pub type Statuses = BTreeMap<Arc<str>, PodStatus>;

/// Handle to the enrollment task.
pub struct Enrollment {
    status: watch::Receiver<Arc<Statuses>>,
    stop: Option<oneshot::Sender<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl Enrollment {
    /// Starts reconciling `local` (the store's local-workloads watch).
    pub fn spawn(
        shared: Shared,
        capture: CaptureMode,
        local: watch::Receiver<Arc<LocalWorkloads>>,
        retry: RetryPolicy,
    ) -> Self {
        let (status_tx, status) = watch::channel(Arc::new(Statuses::new()));
        let (stop_tx, stop_rx) = oneshot::channel();
        let hints = match &capture {
            CaptureMode::Node(manager) => Some(manager.hints().clone()),
            CaptureMode::Dedicated(..) => None,
        };
        let worker = Worker {
            hints,
            shared,
            capture,
            retry,
            running: HashMap::new(),
            failed: HashMap::new(),
            stopping: JoinSet::new(),
            status: status_tx,
        };
        let task = tokio::spawn(worker.run(local, stop_rx));
        Enrollment {
            status,
            stop: Some(stop_tx),
            task,
        }
    }

    /// Status of every local pod; changes on every enrollment or failure.
    pub fn status(&self) -> watch::Receiver<Arc<Statuses>> {
        self.status.clone()
    }

    /// Stops serving every pod (listeners closed, open connections given `deadline`) and waits.
    /// Capture rules and certificates stay: the pods are still enrolled.
    pub async fn shutdown(mut self, deadline: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
        }
        if let Err(e) = (&mut self.task).await {
            tracing::error!(error = %e, "enrollment task ended abnormally");
        }
    }
}

/// A pod whose proxies are running.
struct Running {
    ip: IpAddr,
    /// Whether the pod's IPv6 was asked to be captured or closed.
    ipv6: Ipv6Capture,
    identity: Identity,
    name: Arc<str>,
    capture: Arc<CapturedPod>,
    drain: DrainTrigger,
    tasks: JoinSet<()>,
}

struct Failed {
    attempts: u32,
    retry_at: Instant,
    reason: String,
    ip: IpAddr,
}

/// Why a pod stops being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// It left the mesh: rules removed, identity released.
    Unenroll,
    /// ztunnel is stopping: rules and certificate stay for the next ztunnel.
    Exit,
    /// The pod's sandbox was replaced (the CNI reported it in another namespace): the old
    /// namespace is left as it is (the runtime is deleting it, rules and all), the identity is
    /// released after the drain (the pod in its new namespace holds it again).
    Moved,
}

struct Worker {
    shared: Shared,
    /// Pods the CNI plugin reported: enrolled as soon as they are, by the address it gave.
    hints: Option<Hints>,
    capture: CaptureMode,
    retry: RetryPolicy,
    running: HashMap<Arc<str>, Running>,
    failed: HashMap<Arc<str>, Failed>,
    /// Pods draining in the background.
    stopping: JoinSet<()>,
    status: watch::Sender<Arc<Statuses>>,
}

/// A pod's IPv6 can be meshed only when the mesh knows one of its IPv6 addresses: inbound
/// HBONE names the pod by address, and policy and the workload lookups need it. Otherwise
/// its IPv6 is closed.
fn ipv6_capture(w: &Workload) -> Ipv6Capture {
    if w.addresses.iter().any(IpAddr::is_ipv6) {
        Ipv6Capture::Captured
    } else {
        Ipv6Capture::Closed
    }
}

impl Worker {
    /// The address ztunnel captures a workload by: its first (the pod's primary IP), else the
    /// one the CNI plugin reported (the controller has not published it yet).
    fn enrolled_ip(&self, w: &Workload) -> Option<IpAddr> {
        if w.protocol != TunnelProtocol::Hbone {
            return None;
        }
        w.addresses.first().copied().or_else(|| {
            self.hints
                .as_ref()?
                .find(&w.uid, None)?
                .ips
                .first()
                .copied()
        })
    }

    async fn run(
        mut self,
        mut local: watch::Receiver<Arc<LocalWorkloads>>,
        mut stop: oneshot::Receiver<Duration>,
    ) {
        let mut hinted = self.hints.as_ref().map(Hints::subscribe);
        loop {
            let desired = local.borrow_and_update().clone();
            self.reconcile(&desired).await;
            let retry_at = self.failed.values().map(|f| f.retry_at).min();
            tokio::select! {
                deadline = &mut stop => {
                    let deadline = deadline.unwrap_or(self.shared.settings.drain_deadline);
                    self.shutdown(deadline).await;
                    return;
                }
                changed = local.changed() => {
                    if changed.is_err() {
                        // The store is gone: nothing will change any more; keep serving
                        // until told to stop.
                        let deadline = (&mut stop).await.unwrap_or(self.shared.settings.drain_deadline);
                        self.shutdown(deadline).await;
                        return;
                    }
                }
                () = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                Some(_) = self.stopping.join_next(), if !self.stopping.is_empty() => {}
                changed = async {
                    match hinted.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_ok() {
                        self.stop_moved().await;
                        self.retry_hinted_now();
                    } else {
                        hinted = None;
                    }
                }
            }
        }
    }

    async fn reconcile(&mut self, desired: &LocalWorkloads) {
        // Stop what must not run (gone, un-enrolled, or changed).
        let stale: Vec<Arc<str>> = self
            .running
            .iter()
            .filter(|(uid, r)| match desired.get(*uid) {
                Some(w) => {
                    self.enrolled_ip(w) != Some(r.ip)
                        || w.identity != r.identity
                        || ipv6_capture(w) != r.ipv6
                }
                None => true,
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            if let Some(r) = self.running.remove(&uid) {
                self.stop_pod(&uid, r, self.shared.settings.drain_deadline, Stop::Unenroll)
                    .await;
            }
        }
        let gone: Vec<(Arc<str>, IpAddr)> = self
            .failed
            .iter()
            .filter(|(uid, f)| desired.get(*uid).and_then(|w| self.enrolled_ip(w)) != Some(f.ip))
            .map(|(uid, f)| (uid.clone(), f.ip))
            .collect();
        for (uid, ip) in gone {
            self.failed.remove(&uid);
            self.remove_unserved(&uid, ip).await;
        }
        // Start what should run.
        let now = Instant::now();
        for (uid, w) in desired.iter() {
            let Some(ip) = self.enrolled_ip(w) else {
                continue;
            };
            if self.running.contains_key(uid) {
                continue;
            }
            if self.failed.get(uid).is_some_and(|f| f.retry_at > now) {
                continue;
            }
            match self.start_pod(w, ip).await {
                Ok(running) => {
                    self.failed.remove(uid);
                    self.running.insert(uid.clone(), running);
                }
                Err(e) => {
                    let attempts = self.failed.get(uid).map_or(0, |f| f.attempts) + 1;
                    let exp = attempts.saturating_sub(1).min(16);
                    let delay = (self.retry.initial * 2u32.pow(exp)).min(self.retry.max);
                    let reason = error_chain(&e);
                    let pod = format!("{}/{}", w.namespace, w.name);
                    let retry_in_ms = delay.as_millis() as u64;
                    // The state often names a pod before its sandbox exists on the node (the
                    // controller sees the pod before the runtime has made its namespace):
                    // the first few misses are expected, not worth a warning.
                    if e.is_sandbox_not_yet_there() && attempts <= SANDBOX_GRACE_ATTEMPTS {
                        tracing::debug!(%pod, uid = %uid, %ip, reason = %reason, attempts, retry_in_ms, "pod's network namespace not there yet; will retry");
                    } else {
                        tracing::warn!(%pod, uid = %uid, %ip, reason = %reason, attempts, retry_in_ms, "cannot enroll pod; will retry");
                    }
                    self.failed.insert(
                        uid.clone(),
                        Failed {
                            attempts,
                            retry_at: Instant::now() + delay,
                            reason,
                            ip,
                        },
                    );
                }
            }
        }
        self.publish();
    }

    /// A served pod the CNI plugin reported in another namespace than the one it is served in
    /// had its sandbox recreated (same pod, new namespace; a runtime does that when a pod's
    /// sandbox dies, and the local mesh when a pod is deleted and created again). Stopping it
    /// lets the next reconcile serve it in the new namespace, where the plugin's rules wait;
    /// otherwise ztunnel would keep serving the dead namespace and the pod stay refused.
    async fn stop_moved(&mut self) {
        let Some(hints) = &self.hints else { return };
        let moved: Vec<Arc<str>> = self
            .running
            .iter()
            .filter(|(uid, r)| {
                hints
                    .find(uid, Some(r.ip))
                    .is_some_and(|h| r.capture.netns_differs(&h.netns))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in moved {
            if let Some(r) = self.running.remove(&uid) {
                self.stop_pod(&uid, r, self.shared.settings.drain_deadline, Stop::Moved)
                    .await;
            }
        }
    }

    /// A pod the CNI plugin just reported is retried now, not after its back-off: its
    /// namespace exists and its rules are in, so it can be served at once.
    fn retry_hinted_now(&mut self) {
        let Some(hints) = &self.hints else { return };
        let now = Instant::now();
        for (uid, f) in self.failed.iter_mut() {
            if hints.find(uid, Some(f.ip)).is_some() {
                f.retry_at = now;
            }
        }
    }

    fn publish(&self) {
        let mut statuses = Statuses::new();
        for (uid, r) in &self.running {
            statuses.insert(
                uid.clone(),
                PodStatus::Enrolled {
                    ip: r.ip,
                    identity: r.identity.to_string(),
                },
            );
        }
        for (uid, f) in &self.failed {
            statuses.insert(
                uid.clone(),
                PodStatus::Failed {
                    reason: f.reason.clone(),
                    attempts: f.attempts,
                },
            );
        }
        self.status.send_if_modified(|cur| {
            if **cur == statuses {
                false
            } else {
                *cur = Arc::new(statuses);
                true
            }
        });
    }

    async fn start_pod(&mut self, w: &Workload, ip: IpAddr) -> Result<Running, EnrollError> {
        // Start fetching the certificate now, so the first connection does not wait on the CA.
        self.shared.certs.ensure(&w.identity);
        let ipv6 = ipv6_capture(w);
        let captured = match &self.capture {
            CaptureMode::Node(manager) => manager.enroll_with(ip, &w.uid, ipv6).await,
            CaptureMode::Dedicated(rules, handover) => {
                let rules = RuleConfig {
                    ipv6,
                    ..rules.clone()
                };
                capture::dedicated_with(&w.uid, rules, handover)
                    .await
                    .map(Arc::new)
            }
        };
        let captured = match captured {
            Ok(c) => c,
            Err(e) => {
                self.shared.certs.release(&w.identity);
                return Err(EnrollError::Capture(e));
            }
        };
        let Some(listeners) = captured.take_listeners() else {
            // Re-capture from scratch on the next attempt.
            self.remove_capture(&w.uid, &captured).await;
            self.shared.certs.release(&w.identity);
            return Err(EnrollError::ListenersTaken);
        };
        let pod = Arc::new(PodProxy::new(&self.shared, w, ip, captured.clone()));
        let (trigger, watcher) = drain::channel();
        let tasks = proxy::spawn(&self.shared, pod.clone(), listeners, watcher);
        tracing::info!(pod = %pod.name, uid = %w.uid, %ip, identity = %w.identity, "pod enrolled");
        Ok(Running {
            ip,
            ipv6,
            identity: w.identity.clone(),
            name: pod.name.clone(),
            capture: captured,
            drain: trigger,
            tasks,
        })
    }

    /// Removes rules a pod may carry although this ztunnel never served it (see module docs).
    async fn remove_unserved(&self, uid: &str, ip: IpAddr) {
        let CaptureMode::Node(manager) = &self.capture else {
            return;
        };
        match manager.remove_unserved(uid, ip).await {
            Ok(true) => tracing::info!(uid, %ip, "capture rules of a pod that left removed"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(uid, %ip, error = %error_chain(&e), "cannot remove capture rules")
            }
        }
    }

    async fn remove_capture(&self, uid: &str, captured: &CapturedPod) {
        let removed = match &self.capture {
            CaptureMode::Node(manager) => manager.remove(uid).await.map(drop),
            CaptureMode::Dedicated(..) => captured.teardown().await,
        };
        if let Err(e) = removed {
            tracing::error!(uid, error = %error_chain(&e), "cannot remove capture rules");
        }
    }

    /// Stops serving the pod now and drains its proxies in the background. Un-enrolling
    /// removes its rules first and then releases its identity; exiting leaves both.
    async fn stop_pod(&mut self, uid: &str, r: Running, deadline: Duration, how: Stop) {
        match how {
            Stop::Unenroll => {
                tracing::info!(pod = %r.name, uid, "un-enrolling pod");
                // Rules first: from here on new connections reach the app directly.
                self.remove_capture(uid, &r.capture).await;
            }
            Stop::Exit | Stop::Moved => {
                if how == Stop::Moved {
                    tracing::info!(pod = %r.name, uid, "pod's sandbox replaced; serving its new namespace");
                }
                match &self.capture {
                    CaptureMode::Node(manager) => {
                        manager.release(uid).await;
                    }
                    CaptureMode::Dedicated(..) => r.capture.release(),
                }
            }
        }
        let certs = (how != Stop::Exit).then(|| self.shared.certs.clone());
        self.stopping.spawn(async move {
            let Running {
                name,
                identity,
                drain,
                mut tasks,
                ..
            } = r;
            let outcome = drain.drain_and_wait(deadline).await;
            if let DrainOutcome::DeadlineExceeded { remaining } = outcome {
                tracing::info!(pod = %name, remaining, "connections cut at the drain deadline");
            }
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            match certs {
                Some(certs) => {
                    certs.release(&identity);
                    if how == Stop::Unenroll {
                        tracing::info!(pod = %name, "pod un-enrolled");
                    }
                }
                None => tracing::info!(pod = %name, "pod drained; it stays captured"),
            }
        });
    }

    async fn shutdown(&mut self, deadline: Duration) {
        let uids: Vec<Arc<str>> = self.running.keys().cloned().collect();
        for uid in uids {
            if let Some(r) = self.running.remove(&uid) {
                self.stop_pod(&uid, r, deadline, Stop::Exit).await;
            }
        }
        self.failed.clear();
        self.publish();
        while self.stopping.join_next().await.is_some() {}
    }
}
