//! The certificate manager: one workload certificate per local identity, fetched before
//! it is needed and rotated before it expires.
//!
//! ztunnel originates and terminates mTLS *as* the pods on its node, so it holds one
//! certificate per identity (service account) that has a pod here. [`CertManager`] is a
//! cheap `Clone` handle; per identity it runs a small worker task that:
//!
//! - generates a key locally and asks the CA to sign a CSR for it (the key never leaves
//!   the process), as soon as the first workload with that identity appears
//!   ([`CertManager::ensure`]), so the first connection does not wait on the CA;
//! - checks the answer: the leaf must name exactly the identity asked for and match our
//!   key (a CA answering for someone else must not make us impersonate them);
//! - publishes it on a `watch` channel and sleeps until half-life
//!   ([`WorkloadCertificate::refresh_at`]), then starts over. Consumers take
//!   [`CertManager::current`] on each new handshake, so rotation never touches open
//!   connections: they keep the `Arc` they handshook with;
//! - on CA failure, retries with jittered exponential back-off while the old certificate
//!   stays in use until it actually expires.
//!
//! Workloads sharing an identity share the certificate (a refcount); when the last one
//! leaves ([`CertManager::release`]) the worker stops and the certificate is forgotten.
//!
//! With a node directory ([`CertManager::with_node_dir`]) every issued certificate is also
//! written there (key included, owner-only), and a new identity starts from the one kept
//! there if it is still valid: a restarted ztunnel serves before the CA answers, and renews
//! at the kept certificate's half-life as usual. An expired or unreadable file is logged and
//! never used; the identity then waits for the CA.
//! The CA client ([`CaClient`], gRPC in [`grpc`]) and the wall clock ([`Clock`]) are
//! injected, so tests drive rotation with tokio's paused time ([`local::InProcessCa`]
//! and [`TokioClock`]).

pub mod grpc;
pub mod local;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ambit_hbone::cert::{CertError, WorkloadCertificate};
use ambit_hbone::csr::{self, CsrError};
use ambit_hbone::Identity;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::node_dir::NodeDir;
use crate::telemetry::error_chain;

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// Generating the key or the CSR failed locally.
    #[error("cannot create a key and CSR for {identity}")]
    Csr {
        /// The identity asked for.
        identity: Identity,
        // Boxed: hbone's errors are large, and this one travels by value on every path.
        #[source]
        source: Box<CsrError>,
    },
    /// The credential file could not be read.
    #[error("cannot read the CA credential from {path}")]
    Credential {
        /// The file configured.
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The credential file is empty or not a valid header value.
    #[error("the CA credential in {path} is empty or not a valid header value")]
    BadCredential {
        /// The file configured.
        path: std::path::PathBuf,
    },
    /// The CA could not be reached or refused the request (a gRPC status; transport
    /// causes are folded into the message, since `tonic::Status` prints poorly).
    #[error("certificate request failed ({code:?}): {message}")]
    Rpc {
        /// The gRPC status code (`Unavailable` for an unreachable CA).
        code: tonic::Code,
        /// The status message and, for transport failures, their causes.
        message: String,
    },
    /// The CA refused to sign (an in-process CA's own error, with its causes).
    #[error("the CA refused to sign: {reason}")]
    Refused {
        /// Why, as the CA put it.
        reason: String,
    },
    /// The CA did not answer within the request timeout.
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    /// The chain the CA returned is unusable (unparseable, wrong key, no roots...).
    #[error("the CA returned an unusable certificate for {identity}")]
    Invalid {
        /// The identity asked for.
        identity: Identity,
        #[source]
        source: Box<CertError>,
    },
    /// The CA returned a certificate for another identity than the one asked for.
    #[error("asked the CA for {requested} but got a certificate for {received}")]
    WrongIdentity {
        /// The identity asked for.
        requested: Identity,
        /// The identity in the returned leaf.
        received: Identity,
    },
    /// The returned certificate is already expired by our clock.
    #[error("the CA returned a certificate for {identity} that expired at {not_after:?}")]
    Expired {
        /// The identity asked for.
        identity: Identity,
        /// The leaf's not-after.
        not_after: SystemTime,
    },
    /// The identity is not (or no longer) managed: nobody called `ensure` for it, or
    /// the last workload with it was released.
    #[error("no local workload has identity {0}")]
    NotManaged(Identity),
}

/// What the CA answered: PEM certificates, leaf first, and the mesh's PEM roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedChain {
    /// Leaf first, then intermediates (never the root).
    pub cert_chain: Vec<String>,
    /// The mesh's trust roots.
    pub trust_roots: Vec<String>,
}

/// Something that signs CSRs: the controller's CA over gRPC ([`grpc::GrpcCaClient`]),
/// or an in-process CA in tests.
pub trait CaClient: Send + Sync + 'static {
    /// Asks for a certificate for the CSR's identity, valid for `validity` (the CA may
    /// shorten it).
    fn sign(
        &self,
        csr_pem: String,
        validity: Duration,
    ) -> impl Future<Output = Result<SignedChain, CertsError>> + Send;
}

/// The wall clock certificates are judged by.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's clock, so paused-time tests move validity
/// windows and timers together.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: SystemTime,
    mono: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading the current wall time now, advancing with `tokio::time`.
    pub fn new() -> Self {
        TokioClock {
            wall: SystemTime::now(),
            mono: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.mono.elapsed()
    }
}

/// Tuning of requests and retries.
#[derive(Debug, Clone)]
pub struct CertConfig {
    /// Lifetime asked of the CA.
    pub validity: Duration,
    /// First retry delay after a failure; doubles per failure.
    pub initial_backoff: Duration,
    /// Longest delay between retries.
    pub max_backoff: Duration,
    /// How long one CA request may take.
    pub request_timeout: Duration,
}

impl Default for CertConfig {
    fn default() -> Self {
        CertConfig {
            validity: ambit_hbone::ca::DEFAULT_CERT_VALIDITY,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// What is known about one identity's certificate.
#[derive(Debug, Clone, Default)]
struct CertState {
    cert: Option<Arc<WorkloadCertificate>>,
    /// The last failure, cleared by the next success.
    last_error: Option<Arc<str>>,
    /// Consecutive failures since the last success.
    failures: u32,
}

struct Entry {
    /// Local workloads with this identity.
    refs: usize,
    state: watch::Sender<CertState>,
    worker: tokio::task::AbortHandle,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

type Spawn = dyn Fn(Identity, watch::Sender<CertState>) -> tokio::task::AbortHandle + Send + Sync;

struct Inner {
    entries: Mutex<HashMap<Identity, Entry>>,
    clock: Arc<dyn Clock>,
    metrics: Option<Metrics>,
    node_dir: Option<NodeDir>,
    /// Starts a worker; a closure so the handle need not be generic over the CA client.
    spawn: Box<Spawn>,
}

/// Handle to the certificate manager. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("identities", &self.lock().len())
            .finish()
    }
}

/// How one identity's certificate stands, for the admin `/certs` page. Never holds keys.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertStatus {
    pub identity: Identity,
    /// `ready`, `pending` (never fetched yet) or `expired` (the CA has been failing).
    pub state: &'static str,
    /// Local workloads using it.
    pub workloads: usize,
    /// Serial of the current leaf, hex.
    pub serial: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    /// Seconds until the current leaf expires.
    pub expires_in_seconds: Option<u64>,
    /// When rotation is due (half-life).
    pub refresh_at: Option<String>,
    /// Issuer of the current leaf.
    pub issuer: Option<String>,
    /// The last failure to obtain a certificate, if the CA has failed since the last
    /// success.
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
}

impl CertManager {
    /// Starts a manager asking `ca` for certificates; must be called inside a tokio
    /// runtime (workers are spawned on it).
    pub fn new<C: CaClient, K: Clock>(
        ca: C,
        clock: K,
        config: CertConfig,
        metrics: Option<Metrics>,
    ) -> Self {
        Self::with_node_dir(ca, clock, config, metrics, None)
    }

    /// [`Self::new`], keeping certificates in `node_dir` (see the module docs).
    pub fn with_node_dir<C: CaClient, K: Clock>(
        ca: C,
        clock: K,
        config: CertConfig,
        metrics: Option<Metrics>,
        node_dir: Option<NodeDir>,
    ) -> Self {
        let ca = Arc::new(ca);
        let clock: Arc<dyn Clock> = Arc::new(clock);
        let spawn = {
            let clock = clock.clone();
            let metrics = metrics.clone();
            let node_dir = node_dir.clone();
            move |identity: Identity, state: watch::Sender<CertState>| {
                let worker = Worker {
                    identity,
                    ca: ca.clone(),
                    clock: clock.clone(),
                    config: config.clone(),
                    metrics: metrics.clone(),
                    node_dir: node_dir.clone(),
                    state,
                };
                tokio::spawn(worker.run()).abort_handle()
            }
        };
        CertManager {
            inner: Arc::new(Inner {
                entries: Mutex::new(HashMap::new()),
                clock,
                metrics,
                node_dir,
                spawn: Box::new(spawn),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // Entries are replaced whole, never left half-updated, so a poisoned lock (a
        // panic elsewhere while holding it) still guards a consistent map.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A workload with `identity` appeared on this node: fetch its certificate now if
    /// it is the first one, else count one more user of the shared certificate. Call
    /// once per workload, inside the runtime (a worker may be spawned), and pair with
    /// [`Self::release`].
    pub fn ensure(&self, identity: &Identity) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(identity) {
            entry.refs += 1;
            return;
        }
        let kept = self.kept(identity);
        if kept.is_none() {
            tracing::info!(%identity, "fetching certificate for new local identity");
        }
        let (state, _) = watch::channel(CertState {
            cert: kept.map(Arc::new),
            ..CertState::default()
        });
        let worker = (self.inner.spawn)(identity.clone(), state.clone());
        entries.insert(
            identity.clone(),
            Entry {
                refs: 1,
                state,
                worker,
            },
        );
    }

    /// A workload with `identity` left: when it was the last, stop rotating and forget
    /// the certificate (connections that still hold it keep their `Arc`).
    pub fn release(&self, identity: &Identity) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(identity) else {
            tracing::warn!(%identity, "release of an identity that is not managed");
            return;
        };
        entry.refs -= 1;
        if entry.refs == 0 {
            // Dropping the entry aborts the worker and closes the watch channel, which
            // wakes `wait_ready` callers with `NotManaged`.
            entries.remove(identity);
            drop(entries);
            if let Some(m) = &self.inner.metrics {
                m.remove_certificate(identity);
            }
            if let Some(dir) = &self.inner.node_dir {
                if let Err(e) = dir.remove_cert(identity) {
                    tracing::warn!(%identity, error = %error_chain(&e), "cannot delete the kept certificate");
                }
            }
            tracing::info!(%identity, "no local workload left; certificate forgotten");
        }
    }

    /// The certificate kept in the node directory for `identity`, if it is still valid.
    fn kept(&self, identity: &Identity) -> Option<WorkloadCertificate> {
        let dir = self.inner.node_dir.as_ref()?;
        match dir.load_cert(identity, self.inner.clock.now()) {
            Ok(Some(cert)) => {
                tracing::info!(
                    %identity,
                    serial = %cert.summary().serial,
                    not_after = %rfc3339(cert.not_after()),
                    "serving with the certificate kept in the node directory until the CA renews it"
                );
                if let Some(m) = &self.inner.metrics {
                    m.set_certificate_expiry(identity, cert.not_after());
                }
                Some(cert)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    %identity,
                    error = %error_chain(&e),
                    "not using the certificate kept in the node directory; waiting for the CA"
                );
                None
            }
        }
    }

    /// The certificate to use for a new handshake as `identity`: `None` when the
    /// identity is not managed, not fetched yet, or its certificate has expired.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let entries = self.lock();
        let cert = entries.get(identity)?.state.borrow().cert.clone()?;
        (!cert.is_expired(self.inner.clock.now())).then_some(cert)
    }

    /// Waits until `identity` has a valid certificate and returns it. Fails if the
    /// identity is not managed or is released while waiting; put a timeout around it
    /// to bound the wait on an unreachable CA.
    pub async fn wait_ready(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, CertsError> {
        let mut rx = self
            .lock()
            .get(identity)
            .map(|e| e.state.subscribe())
            .ok_or_else(|| CertsError::NotManaged(identity.clone()))?;
        let clock = self.inner.clock.clone();
        let ready = rx
            .wait_for(|s| s.cert.as_ref().is_some_and(|c| !c.is_expired(clock.now())))
            .await
            .map(|s| s.cert.clone());
        match ready {
            Ok(Some(cert)) => Ok(cert),
            _ => Err(CertsError::NotManaged(identity.clone())),
        }
    }

    /// Waits until every identity in `identities` has a valid certificate: what the
    /// readiness task "certificates for local workloads" waits for at startup. The
    /// fetches already run concurrently (one worker each), so waiting in turn costs
    /// nothing.
    pub async fn wait_all_ready(&self, identities: &[Identity]) -> Result<(), CertsError> {
        for identity in identities {
            self.wait_ready(identity).await?;
        }
        Ok(())
    }

    /// Identities currently managed.
    pub fn identities(&self) -> Vec<Identity> {
        let mut ids: Vec<_> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Status of every managed identity, sorted, for the admin `/certs` page.
    pub fn status(&self) -> Vec<CertStatus> {
        let now = self.inner.clock.now();
        let mut out: Vec<CertStatus> = self
            .lock()
            .iter()
            .map(|(identity, entry)| {
                let s = entry.state.borrow();
                let cert = s.cert.as_ref();
                let summary = cert.map(|c| c.summary());
                let state = match cert {
                    None => "pending",
                    Some(c) if c.is_expired(now) => "expired",
                    Some(_) => "ready",
                };
                CertStatus {
                    identity: identity.clone(),
                    state,
                    workloads: entry.refs,
                    serial: summary.as_ref().map(|s| s.serial.clone()),
                    not_before: summary.as_ref().map(|s| s.not_before.clone()),
                    not_after: summary.as_ref().map(|s| s.not_after.clone()),
                    expires_in_seconds: cert.map(|c| {
                        c.not_after()
                            .duration_since(now)
                            .unwrap_or_default()
                            .as_secs()
                    }),
                    refresh_at: cert.map(|c| rfc3339(c.refresh_at())),
                    issuer: summary.map(|s| s.issuer),
                    last_error: s.last_error.as_deref().map(str::to_string),
                    consecutive_failures: s.failures,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

/// Keeps one identity's certificate fresh.
struct Worker<C> {
    identity: Identity,
    ca: Arc<C>,
    clock: Arc<dyn Clock>,
    config: CertConfig,
    metrics: Option<Metrics>,
    node_dir: Option<NodeDir>,
    state: watch::Sender<CertState>,
}

impl<C: CaClient> Worker<C> {
    async fn run(self) {
        let mut backoff = self.config.initial_backoff;
        // Started from a kept certificate: renew it at its half-life, like one just issued.
        let kept_refresh = self.state.borrow().cert.as_ref().map(|c| c.refresh_at());
        if let Some(Ok(wait)) = kept_refresh.map(|at| at.duration_since(self.clock.now())) {
            tokio::time::sleep(wait).await;
        }
        loop {
            match self.fetch().await {
                Ok(cert) => {
                    let refresh_at = cert.refresh_at();
                    tracing::info!(
                        identity = %self.identity,
                        serial = %cert.summary().serial,
                        not_after = %rfc3339(cert.not_after()),
                        refresh_at = %rfc3339(refresh_at),
                        "certificate issued"
                    );
                    if let Some(m) = &self.metrics {
                        m.set_certificate_expiry(&self.identity, cert.not_after());
                    }
                    self.keep(&cert).await;
                    self.state.send_modify(|s| {
                        s.cert = Some(Arc::new(cert));
                        s.last_error = None;
                        s.failures = 0;
                    });
                    match refresh_at.duration_since(self.clock.now()) {
                        Ok(wait) if !wait.is_zero() => {
                            backoff = self.config.initial_backoff;
                            tokio::time::sleep(wait).await;
                        }
                        // Already past half-life on arrival (a very short lifetime or a
                        // CA clock far behind ours): use it, but renew on the back-off
                        // schedule rather than hammering the CA in a loop.
                        _ => {
                            let delay = jitter(backoff);
                            backoff = (backoff * 2).min(self.config.max_backoff);
                            tracing::warn!(
                                identity = %self.identity,
                                retry_in_ms = delay.as_millis() as u64,
                                "certificate arrived past its half-life; check the CA's clock and lifetime"
                            );
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
                Err(e) => {
                    let delay = jitter(backoff);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    let error = error_chain(&e);
                    let now = self.clock.now();
                    let holding = self
                        .state
                        .borrow()
                        .cert
                        .as_ref()
                        .is_some_and(|c| !c.is_expired(now));
                    tracing::warn!(
                        identity = %self.identity,
                        %error,
                        retry_in_ms = delay.as_millis() as u64,
                        still_valid = holding,
                        "cannot obtain certificate; retrying"
                    );
                    self.state.send_modify(|s| {
                        s.last_error = Some(error.into());
                        s.failures += 1;
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Writes `cert` to the node directory (off the runtime: it fsyncs).
    async fn keep(&self, cert: &WorkloadCertificate) {
        let Some(dir) = self.node_dir.clone() else {
            return;
        };
        let (cert, identity) = (cert.clone(), self.identity.clone());
        let saved = tokio::task::spawn_blocking(move || dir.save_cert(&cert)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                %identity,
                error = %error_chain(&e),
                "cannot keep the certificate in the node directory; a restart will wait for the CA"
            ),
            Err(e) => tracing::warn!(%identity, error = %e, "certificate write task failed"),
        }
    }

    async fn fetch(&self) -> Result<WorkloadCertificate, CertsError> {
        let identity = &self.identity;
        let request = csr::new_csr(identity).map_err(|source| CertsError::Csr {
            identity: identity.clone(),
            source: Box::new(source),
        })?;
        let timeout = self.config.request_timeout;
        let signed = tokio::time::timeout(
            timeout,
            self.ca.sign(request.csr_pem.clone(), self.config.validity),
        )
        .await
        .map_err(|_| CertsError::Timeout(timeout))??;
        let invalid = |source| CertsError::Invalid {
            identity: identity.clone(),
            source: Box::new(source),
        };
        let chain =
            ambit_hbone::cert::parse_pem_certs(&signed.cert_chain.concat()).map_err(invalid)?;
        let roots =
            ambit_hbone::cert::parse_pem_certs(&signed.trust_roots.concat()).map_err(invalid)?;
        // Checks the leaf's single SPIFFE SAN and that it certifies our key.
        let cert =
            WorkloadCertificate::new(chain, request.private_key(), roots).map_err(invalid)?;
        if cert.identity() != identity {
            return Err(CertsError::WrongIdentity {
                requested: identity.clone(),
                received: cert.identity().clone(),
            });
        }
        if cert.is_expired(self.clock.now()) {
            return Err(CertsError::Expired {
                identity: identity.clone(),
                not_after: cert.not_after(),
            });
        }
        Ok(cert)
    }
}

/// Half the delay plus a random share of the other half, so a node's identities (and
/// a fleet of nodes after a CA outage) do not retry in lockstep.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(rand::random::<f64>())
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
