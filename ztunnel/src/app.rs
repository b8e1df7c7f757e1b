//! The assembled node proxy: state source -> store -> enrollment (capture + per-pod proxies),
//! certificates, and the operations ports. `main` runs it until a signal; tests run one per
//! node in-process with an injected CA client ([`App::start`]).
//!
//! Shutdown ([`App::shutdown`]): listeners stop accepting, open connections get the drain
//! deadline, then the operations servers stop. Pods stay captured (their rules belong to their
//! enrollment): until a ztunnel adopts them their connections are refused, never carried in
//! plaintext.
//!
//! With a node directory (`--data-dir`), the last acknowledged state and the workload
//! certificates are kept there; a start with the controller unreachable serves from them at
//! once, and the controller's first full state replaces the kept one when it answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_hbone::ca::CertificateAuthority;
use ambit_hbone::throttle::LogThrottle;
use serde_json::json;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::admin::{Admin, AdminError, AdminServer};
use crate::capture::{CaptureConfig, CaptureManager};
use crate::certs::grpc::GrpcCaClient;
use crate::certs::local::InProcessCa;
use crate::certs::{CaClient, CertConfig, CertManager, CertsError, SignedChain, SystemClock};
use crate::config::{CaSource, Config, Mode, StateSource};
use crate::control::{self, ControlError};
use crate::decision::Balancer;
use crate::discovery::{Backoff, DiscoveryClient, DiscoveryConfig};
use crate::drain::{self, DrainOutcome, DrainTrigger, ShutdownRequest};
use crate::enrollment::{CaptureMode, Enrollment, RetryPolicy, Statuses};
use crate::http_server::ServerError;
use crate::limits::NodeLimits;
use crate::metrics::{Metrics, MetricsServer};
use crate::node_dir::NodeDir;
use crate::proxy::{ProxySettings, Shared};
use crate::readiness::{ReadinessServer, Ready};
use crate::state::static_file::{self, StaticFileError};
use crate::state::{ApplyOutcome, StateReader, Store, StoreError, TunnelProtocol};
use crate::telemetry::{error_chain, LogHandle};

/// Why the app could not start (or reload its state).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The controller channel could not be set up.
    #[error("cannot set up the controller connection")]
    Control(#[source] ControlError),
    /// The local CA's files could not be read.
    #[error("cannot read the local CA from {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The local CA is unusable.
    #[error("cannot load the local CA")]
    LoadCa(#[source] ambit_hbone::ca::CaError),
    /// No CA configured and none injected.
    #[error("no CA configured")]
    NoCa,
    /// The static state file is unusable.
    #[error("cannot load the static state")]
    StaticState(#[source] StaticFileError),
    /// The store rejected the state.
    #[error("the state was rejected")]
    Store(#[source] StoreError),
    /// Reloading asked of an app fed by a controller.
    #[error("the state comes from the controller; there is no file to reload")]
    NotStatic,
    /// An operations port could not be bound.
    #[error("cannot start the {what} server")]
    Bind {
        what: &'static str,
        #[source]
        source: ServerError,
    },
    /// The admin port could not be bound.
    #[error("cannot start the admin server")]
    Admin(#[source] AdminError),
}

/// The CA client a configuration names: the controller's gRPC service, or a local CA.
#[derive(Clone)]
pub enum DefaultCa {
    Grpc(GrpcCaClient),
    Local(InProcessCa),
}

impl CaClient for DefaultCa {
    async fn sign(&self, csr_pem: String, validity: Duration) -> Result<SignedChain, CertsError> {
        match self {
            DefaultCa::Grpc(c) => c.sign(csr_pem, validity).await,
            DefaultCa::Local(c) => c.sign(csr_pem, validity).await,
        }
    }
}

fn read(path: &Path) -> Result<String, AppError> {
    std::fs::read_to_string(path).map_err(|source| AppError::ReadCa {
        path: path.to_path_buf(),
        source,
    })
}

impl DefaultCa {
    /// The CA client `config` describes (must be called inside the runtime).
    pub fn from_config(config: &Config) -> Result<Self, AppError> {
        match &config.ca {
            CaSource::Grpc(url) => {
                let channel = control::channel(
                    url,
                    config.ca_root_file.as_deref(),
                    &config.controller_identity,
                )
                .map_err(AppError::Control)?;
                Ok(DefaultCa::Grpc(GrpcCaClient::new(
                    channel,
                    config.credential_file.clone(),
                )))
            }
            CaSource::Local { cert, key } => {
                let ca = CertificateAuthority::from_pem(
                    &config.trust_domain,
                    &read(cert)?,
                    &read(key)?,
                    None,
                )
                .map_err(AppError::LoadCa)?;
                Ok(DefaultCa::Local(InProcessCa::new(
                    Arc::new(ca),
                    SystemClock,
                )))
            }
            CaSource::Injected => Err(AppError::NoCa),
        }
    }
}

/// The node's budgets, sized from the descriptor limit in force (`main` raised it).
fn node_limits(config: &Config) -> NodeLimits {
    let nofile = crate::limits::current_nofile().unwrap_or_else(|e| {
        // Only if getrlimit itself fails; size for the common soft default.
        tracing::warn!(error = %error_chain(&e), "cannot read the descriptor limit; assuming 1024");
        1024
    });
    let limits = NodeLimits::new(config.limits.clone(), nofile);
    tracing::info!(
        nofile,
        node_connections = limits.connection_cap(),
        pod_connections = config.limits.pod_connections,
        node_handshakes = config.limits.node_handshakes,
        pod_handshakes = config.limits.pod_handshakes,
        "connection limits"
    );
    limits
}

/// A static state file and the writer it feeds.
struct StaticState {
    path: PathBuf,
    store: Mutex<Store>,
    version: std::sync::atomic::AtomicU64,
}

impl StaticState {
    async fn load(&self) -> Result<ApplyOutcome, AppError> {
        let version = self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let push = static_file::load(&self.path, version).map_err(AppError::StaticState)?;
        self.store.lock().await.apply(push).map_err(AppError::Store)
    }
}

/// A running ztunnel.
pub struct App {
    metrics: Metrics,
    certs: CertManager,
    reader: StateReader,
    ready: Ready,
    enrollment: Enrollment,
    static_state: Option<Arc<StaticState>>,
    _discovery: Option<DiscoveryClient>,
    ops_drain: DrainTrigger,
    shutdown: ShutdownRequest,
    drain_deadline: Duration,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    admin_addr: SocketAddr,
    background: Vec<JoinHandle<()>>,
}

impl App {
    /// Starts everything `config` describes, signing certificates with `ca`.
    pub async fn start<C: CaClient>(config: Config, ca: C) -> Result<App, AppError> {
        Self::start_with_logging(config, ca, None).await
    }

    /// [`App::start`] with the process's log handle, for the admin `/logging` endpoint.
    pub async fn start_with_logging<C: CaClient>(
        config: Config,
        ca: C,
        logging: Option<LogHandle>,
    ) -> Result<App, AppError> {
        let metrics = Metrics::new();
        let node_dir = config.data_dir.as_deref().and_then(|path| {
            NodeDir::open(path, &config.node)
                .inspect_err(|e| {
                    tracing::error!(
                        error = %error_chain(e),
                        "cannot use the node directory; a restart will wait for the controller and the CA"
                    )
                })
                .ok()
        });
        let certs = CertManager::with_node_dir(
            ca,
            SystemClock,
            CertConfig {
                validity: config.cert_validity,
                ..CertConfig::default()
            },
            Some(metrics.clone()),
            node_dir.clone(),
        );
        let ready = Ready::new();
        let mut state_ready = Some(ready.register("state"));
        let mut store = Store::new(Some(&config.node));
        let reader = store.reader();
        let mut background = Vec::new();
        let (static_state, discovery) = match &config.state {
            StateSource::StaticFile(path) => {
                let push = static_file::load(path, 1).map_err(AppError::StaticState)?;
                store.apply(push).map_err(AppError::Store)?;
                if let Some(block) = state_ready.take() {
                    block.done();
                }
                let st = Arc::new(StaticState {
                    path: path.clone(),
                    store: Mutex::new(store),
                    version: 1.into(),
                });
                background.push(tokio::spawn(watch_file(st.clone(), config.static_poll)));
                (Some(st), None)
            }
            StateSource::Controller(url) => {
                if node_dir
                    .as_ref()
                    .is_some_and(|d| serve_kept_state(d, &mut store))
                {
                    if let Some(block) = state_ready.take() {
                        block.done();
                    }
                }
                let channel = control::channel(
                    url,
                    config.ca_root_file.as_deref(),
                    &config.controller_identity,
                )
                .map_err(AppError::Control)?;
                let connector = crate::discovery::ConnectFn(move || {
                    let channel = channel.clone();
                    async move { Ok(channel) }
                });
                let client = DiscoveryClient::spawn(
                    connector,
                    store,
                    DiscoveryConfig {
                        node: config.node.clone(),
                        backoff: Backoff::default(),
                        credential_file: config.credential_file.clone(),
                        node_dir: node_dir.clone(),
                    },
                );
                let (waiter, m) = (client.clone(), metrics.clone());
                let mut status = client.status();
                background.push(tokio::spawn(async move {
                    waiter.wait_ready().await;
                    if let Some(block) = state_ready {
                        block.done();
                    }
                    while status.changed().await.is_ok() {
                        let connected = status.borrow().connected;
                        m.set_xds_connected(connected);
                    }
                }));
                (None, Some(client))
            }
        };

        let settings = ProxySettings {
            trust_domain: Arc::from(config.trust_domain.as_str()),
            strict_inbound: config.strict_inbound,
            policy_reevaluation: config.policy_reevaluation,
            drain_deadline: config.drain_deadline,
            ..ProxySettings::default()
        };
        let limits = node_limits(&config);
        let shared = Shared {
            state: reader.clone(),
            certs: certs.clone(),
            metrics: metrics.clone(),
            balancer: Balancer::new(),
            settings: Arc::new(settings),
            throttle: Arc::new(LogThrottle::new(limits.limits().log_interval)),
            limits,
        };
        let capture = match config.mode {
            Mode::Node => CaptureMode::Node(Arc::new(CaptureManager::new(CaptureConfig {
                netns_dir: config.netns_dir.clone(),
                rules: config.rules.clone(),
            }))),
            Mode::Dedicated => CaptureMode::Dedicated(config.rules.clone()),
        };
        let enrollment = Enrollment::spawn(
            shared,
            capture,
            reader.watch_local(),
            RetryPolicy::default(),
        );
        background.push(tokio::spawn(certificates_ready(
            ready.register("certificates of local workloads"),
            reader.clone(),
            certs.clone(),
        )));

        let (ops_drain, watcher) = drain::channel();
        let shutdown = ShutdownRequest::new();
        let metrics_server = MetricsServer::bind(config.metrics_addr, metrics.clone())
            .await
            .map_err(|source| AppError::Bind {
                what: "metrics",
                source,
            })?;
        let readiness = ReadinessServer::bind(config.readiness_addr, ready.clone())
            .await
            .map_err(|source| AppError::Bind {
                what: "readiness",
                source,
            })?;
        let (dump_reader, dump_status) = (reader.clone(), enrollment.status());
        let mut admin = Admin::new()
            .with_config_dump(move || config_dump(&dump_reader, &dump_status))
            .with_certs(certs.clone())
            .with_shutdown(shutdown.clone());
        if let Some(logging) = logging {
            admin = admin.with_logging(logging);
        }
        let admin = AdminServer::bind(config.admin_addr, admin)
            .await
            .map_err(AppError::Admin)?;
        let (metrics_addr, readiness_addr, admin_addr) = (
            metrics_server.local_addr(),
            readiness.local_addr(),
            admin.local_addr(),
        );
        background.push(tokio::spawn(metrics_server.serve(watcher.clone())));
        background.push(tokio::spawn(readiness.serve(watcher.clone())));
        background.push(tokio::spawn(admin.serve(watcher)));
        tracing::info!(
            node = %config.node,
            %metrics_addr,
            %readiness_addr,
            %admin_addr,
            "ztunnel started"
        );
        Ok(App {
            metrics,
            certs,
            reader,
            ready,
            enrollment,
            static_state,
            _discovery: discovery,
            ops_drain,
            shutdown,
            drain_deadline: config.drain_deadline,
            metrics_addr,
            readiness_addr,
            admin_addr,
            background,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn certs(&self) -> &CertManager {
        &self.certs
    }

    pub fn state(&self) -> &StateReader {
        &self.reader
    }

    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn readiness_addr(&self) -> SocketAddr {
        self.readiness_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Local pods and where each stands.
    pub fn enrollment(&self) -> watch::Receiver<Arc<Statuses>> {
        self.enrollment.status()
    }

    /// Re-reads the static state file now (instead of at the next poll).
    pub async fn reload_state(&self) -> Result<ApplyOutcome, AppError> {
        match &self.static_state {
            Some(st) => st.load().await,
            None => Err(AppError::NotStatic),
        }
    }

    /// Resolves when the admin API asked for shutdown (`/quitquitquit`).
    pub async fn shutdown_requested(&self) {
        self.shutdown.requested().await
    }

    /// Drains and stops: listeners closed, open connections given the drain deadline,
    /// operations servers stopped. Pods stay captured (see the module docs).
    pub async fn shutdown(self) -> DrainOutcome {
        let deadline = self.drain_deadline;
        self.enrollment.shutdown(deadline).await;
        let outcome = self.ops_drain.drain_and_wait(deadline).await;
        for task in self.background {
            task.abort();
        }
        outcome
    }
}

/// Applies the state kept in the node directory, if any is usable; returns whether it was.
/// Anything wrong with it is logged with its path and the app waits for the controller.
fn serve_kept_state(dir: &NodeDir, store: &mut Store) -> bool {
    let (push, saved) = match dir.load_state() {
        Ok(Some(kept)) => kept,
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(
                error = %error_chain(&e),
                "not using the state kept in the node directory; waiting for the controller"
            );
            return false;
        }
    };
    match store.apply(push) {
        Ok(outcome) => {
            let age = SystemTime::now()
                .duration_since(saved)
                .unwrap_or_default()
                .as_secs();
            tracing::info!(
                path = %dir.state_path().display(),
                version = outcome.version,
                workloads = outcome.workloads,
                age_seconds = age,
                "serving from the last acknowledged state until the controller answers"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                path = %dir.state_path().display(),
                error = %error_chain(&e),
                "the state kept in the node directory is unusable; waiting for the controller"
            );
            false
        }
    }
}

/// The admin config dump: the state plus this node's pods.
fn config_dump(reader: &StateReader, status: &watch::Receiver<Arc<Statuses>>) -> serde_json::Value {
    let state = serde_json::to_value(&*reader.snapshot())
        .unwrap_or_else(|e| json!({ "error": e.to_string() }));
    let pods = serde_json::to_value(&**status.borrow())
        .unwrap_or_else(|e| json!({ "error": e.to_string() }));
    json!({ "state": state, "local_pods": pods })
}

/// Holds the readiness task until every local enrolled workload has a certificate.
async fn certificates_ready(
    block: crate::readiness::BlockReady,
    reader: StateReader,
    certs: CertManager,
) {
    let mut local = reader.watch_local();
    loop {
        let identities: Vec<_> = local
            .borrow_and_update()
            .values()
            .filter(|w| w.protocol == TunnelProtocol::Hbone)
            .map(|w| w.identity.clone())
            .collect();
        // An identity not managed yet (enrollment has not reached it) reports NotManaged:
        // wait for the next change and look again.
        if certs.wait_all_ready(&identities).await.is_ok() {
            block.done();
            return;
        }
        tokio::select! {
            changed = local.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Re-reads the static state file when its modification time changes.
async fn watch_file(st: Arc<StaticState>, every: Duration) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last: Option<SystemTime> = mtime(&st.path);
    loop {
        tokio::time::sleep(every).await;
        let now = mtime(&st.path);
        if now == last {
            continue;
        }
        last = now;
        match st.load().await {
            Ok(outcome) => tracing::info!(
                path = %st.path.display(),
                version = outcome.version,
                workloads = outcome.workloads,
                "static state reloaded"
            ),
            Err(e) => tracing::warn!(
                path = %st.path.display(),
                error = %error_chain(&e),
                "static state rejected; keeping the last good state"
            ),
        }
    }
}
