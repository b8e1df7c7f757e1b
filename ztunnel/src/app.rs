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
use crate::capture::{CaptureConfig, CaptureManager, RuleConfig};
use crate::certs::grpc::GrpcCaClient;
use crate::certs::local::InProcessCa;
use crate::certs::{CaClient, CertConfig, CertManager, CertsError, SignedChain, SystemClock};
use crate::cni::CniServer;
use crate::config::{CaSource, Config, HandoverMode, Mode, StateSource};
use crate::control::{self, ControlError};
use crate::decision::Balancer;
use crate::discovery::{Backoff, DiscoveryClient, DiscoveryConfig};
use crate::drain::{self, DrainOutcome, DrainTrigger, ShutdownRequest};
use crate::enrollment::{CaptureMode, Enrollment, PodStatus, RetryPolicy, Statuses};
use crate::handover::session::{self, Predecessor, Server, Session, Succession, Want};
use crate::handover::{Handover, Inherited, Registry};
use crate::http_server::ServerError;
use crate::limits::NodeLimits;
use crate::metrics::{Metrics, MetricsServer};
use crate::node_dir::NodeDir;
use crate::proxy::{ProxySettings, Shared};
use crate::readiness::{ReadinessServer, Ready};
use crate::state::static_file::{self, StaticFileError};
use crate::state::{ApplyOutcome, LocalWorkloads, StateReader, Store, StoreError, TunnelProtocol};
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
    upgrade_drain_deadline: Duration,
    /// Set once a successor serves this node (see [`App::replaced`]).
    replaced: watch::Receiver<Option<Succession>>,
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
        // Before anything is bound: take over from the ztunnel running on this node, if any.
        let handover_path = node_dir
            .as_ref()
            .map(|d| d.path().join(crate::handover::SOCKET_NAME));
        let (handover, previous) = take_over(handover_path.as_deref(), config.handover).await;
        let takeover_block = previous.as_ref().map(|_| ready.register(TAKEOVER_TASK));
        let mut state_ready = Some(ready.register("state"));
        // Set once the state is authoritative (the static file, or the controller's first
        // full state; not the kept state alone): the capture sweep waits for it.
        let (authoritative_tx, mut authoritative) = watch::channel(false);
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
                authoritative_tx.send_replace(true);
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
                        metrics_port: Some(config.metrics_addr.port()),
                    },
                );
                let (waiter, m) = (client.clone(), metrics.clone());
                let mut status = client.status();
                background.push(tokio::spawn(async move {
                    waiter.wait_ready().await;
                    if let Some(block) = state_ready {
                        block.done();
                    }
                    authoritative_tx.send_replace(true);
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
            upgrade_drain_deadline: config.upgrade_drain_deadline,
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
            dns: Arc::new(config.dns.clone()),
        };
        let capture = match config.mode {
            Mode::Node => CaptureMode::Node(Arc::new(CaptureManager::with_handover(
                CaptureConfig {
                    netns_dir: config.netns_dir.clone(),
                    // DNS is captured in pods only: in dedicated mode ztunnel's own lookups
                    // share the namespace and would be captured with the workload's.
                    rules: RuleConfig {
                        dns_port: config.dns.enabled.then_some(crate::dns::DNS_PORT),
                        ..config.rules.clone()
                    },
                },
                handover.clone(),
            ))),
            Mode::Dedicated => CaptureMode::Dedicated(config.rules.clone(), handover.clone()),
        };
        // The CNI plugin's socket: pods are reported (and adopted) as their sandbox is made.
        // Without it the plugin still installs the rules and enrollment finds the pods by IP.
        let cni = match (&capture, &node_dir) {
            (CaptureMode::Node(manager), Some(dir)) => match CniServer::bind(dir.path()) {
                Ok(server) => Some((server, manager.hints().clone())),
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "no CNI socket; pods are found by IP");
                    None
                }
            },
            _ => None,
        };
        if let CaptureMode::Node(manager) = &capture {
            let (manager, reader, node) = (manager.clone(), reader.clone(), config.node.clone());
            background.push(tokio::spawn(async move {
                if authoritative.wait_for(|a| *a).await.is_ok() {
                    let swept = crate::capture::sweep::sweep(&manager, &reader, &node).await;
                    tracing::info!(
                        scanned = swept.scanned,
                        released = ?swept.released,
                        "capture sweep done"
                    );
                }
            }));
        }
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
        // In dedicated mode ztunnel and its workload share a namespace that nothing captures
        // before ztunnel does: ready must mean captured, or a client that waits for readiness
        // and connects at once goes out in plaintext. (The side-by-side benchmark did exactly
        // that: its first measurement after a start sometimes bypassed both proxies.) On a
        // node, a pod's rules come from the CNI plugin before the pod runs, and one pod that
        // cannot be enrolled must not hold the node's readiness.
        if config.mode == Mode::Dedicated {
            background.push(tokio::spawn(captured_ready(
                ready.register("capture of this namespace"),
                reader.watch_local(),
                enrollment.status(),
            )));
        }

        let (ops_drain, watcher) = drain::channel();
        let shutdown = ShutdownRequest::new();
        let metrics_server =
            MetricsServer::bind_with(config.metrics_addr, metrics.clone(), &handover)
                .await
                .map_err(|source| AppError::Bind {
                    what: "metrics",
                    source,
                })?;
        let readiness = ReadinessServer::bind_with(config.readiness_addr, ready.clone(), &handover)
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
        let admin = AdminServer::bind_with(config.admin_addr, admin, &handover)
            .await
            .map_err(AppError::Admin)?;
        let (metrics_addr, readiness_addr, admin_addr) = (
            metrics_server.local_addr(),
            readiness.local_addr(),
            admin.local_addr(),
        );
        background.push(tokio::spawn(metrics_server.serve(watcher.clone())));
        background.push(tokio::spawn(readiness.serve(watcher.clone())));
        if let Some((server, hints)) = cni {
            tracing::info!(socket = %server.path().display(), "CNI socket listening");
            background.push(tokio::spawn(server.serve(
                reader.clone(),
                hints,
                watcher.clone(),
            )));
        }
        background.push(tokio::spawn(admin.serve(watcher)));
        let (replaced_tx, replaced) = watch::channel(None);
        background.push(tokio::spawn(succeed_and_serve(Succeed {
            previous: previous.zip(takeover_block),
            ready: ready.clone(),
            inherited: handover.inherited.clone(),
            local: reader.watch_local(),
            status: enrollment.status(),
            path: handover_path,
            registry: handover.registry.clone(),
            replaced: replaced_tx,
        })));
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
            upgrade_drain_deadline: config.upgrade_drain_deadline,
            replaced,
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

    /// Resolves once a successor ztunnel serves this node: it took our listeners, or serves
    /// on its own beside them. Then call [`App::drain_after_upgrade`].
    pub async fn replaced(&self) -> Succession {
        let mut rx = self.replaced.clone();
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                return s;
            }
            if rx.changed().await.is_err() {
                // The hand-over task is gone (no node directory): never replaced.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Drains and stops: listeners closed, open connections given the drain deadline,
    /// operations servers stopped. Pods stay captured (see the module docs).
    pub async fn shutdown(self) -> DrainOutcome {
        let deadline = self.drain_deadline;
        self.drain(deadline).await
    }

    /// [`App::shutdown`] once a successor serves: the listeners are the successor's now (or
    /// it has its own), so stopping to accept refuses nothing, and open connections get the
    /// upgrade's long deadline; the process should exit as soon as the last one ends.
    pub async fn drain_after_upgrade(self) -> DrainOutcome {
        let deadline = self.upgrade_drain_deadline;
        self.drain(deadline).await
    }

    async fn drain(self, deadline: Duration) -> DrainOutcome {
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

/// Holds the readiness task until every local enrolled workload is captured and served.
async fn captured_ready(
    block: crate::readiness::BlockReady,
    mut local: watch::Receiver<Arc<LocalWorkloads>>,
    mut status: watch::Receiver<Arc<Statuses>>,
) {
    loop {
        let all = local_enrolled_served(
            &local.borrow_and_update(),
            &status.borrow_and_update(),
            |_| true,
        );
        if all {
            block.done();
            return;
        }
        tokio::select! {
            changed = local.changed() => if changed.is_err() { return },
            changed = status.changed() => if changed.is_err() { return },
        }
    }
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

/// The readiness task of a successor until the ztunnel it replaces stops accepting.
const TAKEOVER_TASK: &str = "hand-over from the running ztunnel";

/// Asks the ztunnel running on this node (its socket at `path`) for its listeners. Returns
/// what capture and the operations servers take their listeners from, and the session to
/// close once we serve.
async fn take_over(path: Option<&Path>, mode: HandoverMode) -> (Handover, Option<Session>) {
    let want = match mode {
        HandoverMode::Listeners => Want::Listeners,
        HandoverMode::Reuseport => Want::DrainOnly,
    };
    let predecessor = match path {
        // A few frames with deadlines of their own, on a blocking thread.
        Some(path) => {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || session::take_over(&path, want))
                .await
                .unwrap_or_else(|e| Predecessor::None {
                    reason: format!("the hand-over task failed: {e}"),
                })
        }
        None => Predecessor::None {
            reason: "no node directory".into(),
        },
    };
    let (inherited, session) = match predecessor {
        Predecessor::None { reason } => {
            tracing::info!(%reason, "no running ztunnel to take over from");
            (Inherited::default(), None)
        }
        Predecessor::Listeners {
            session,
            inherited,
            pid,
        } => {
            tracing::info!(
                previous = pid,
                listeners = inherited.remaining(),
                "took over the listening sockets of the running ztunnel"
            );
            (inherited, Some(session))
        }
        Predecessor::DrainOnly { session, reason } => {
            tracing::warn!(
                %reason,
                "not taking the running ztunnel's listeners: binding beside them (SO_REUSEPORT); it drains once we serve"
            );
            (Inherited::default(), Some(session))
        }
    };
    let handover = Handover {
        registry: Registry::default(),
        inherited,
    };
    (handover, session)
}

/// What [`succeed_and_serve`] needs.
struct Succeed {
    previous: Option<(Session, crate::readiness::BlockReady)>,
    ready: Ready,
    inherited: Inherited,
    local: watch::Receiver<Arc<LocalWorkloads>>,
    status: watch::Receiver<Arc<Statuses>>,
    path: Option<PathBuf>,
    registry: Registry,
    replaced: watch::Sender<Option<Succession>>,
}

/// Whether this ztunnel serves everything the one it replaces served: every other readiness
/// task done and every local enrolled pod served (a pod that still has a handed-over listener
/// waiting is not).
fn serving_all(s: &Succeed) -> bool {
    let others = s
        .ready
        .pending()
        .iter()
        .filter(|t| *t != TAKEOVER_TASK)
        .count();
    if others > 0 {
        return false;
    }
    let waiting = s.inherited.waiting_pods();
    local_enrolled_served(&s.local.borrow(), &s.status.borrow(), |uid| {
        !waiting.iter().any(|u| **u == *uid)
    })
}

/// Whether every local workload in the mesh (HBONE, with addresses) is enrolled, and `also`
/// holds for it.
fn local_enrolled_served(
    local: &LocalWorkloads,
    status: &Statuses,
    also: impl Fn(&str) -> bool,
) -> bool {
    local.iter().all(|(uid, w)| {
        let enrolled = w.protocol == TunnelProtocol::Hbone && !w.addresses.is_empty();
        !enrolled || (matches!(status.get(uid), Some(PodStatus::Enrolled { .. })) && also(uid))
    })
}

/// Completes the take-over once we serve (the previous ztunnel keeps accepting until then),
/// then serves the hand-over socket for our own successor.
async fn succeed_and_serve(mut s: Succeed) {
    if let Some((session, block)) = s.previous.take() {
        while !serving_all(&s) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let adopted = s.inherited.taken();
        let count = adopted.len();
        let told = tokio::task::spawn_blocking(move || {
            if adopted.is_empty() {
                session.drain()
            } else {
                session.done(adopted)
            }
            .map_err(|e| error_chain(&e))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the hand-over task failed: {e}")));
        match told {
            Ok(()) => tracing::info!(
                adopted = count,
                "serving; the previous ztunnel stops accepting and drains"
            ),
            Err(error) => tracing::warn!(
                %error,
                "serving, but the previous ztunnel could not be told to drain; it serves beside us until stopped"
            ),
        }
        let unused = s.inherited.release_rest();
        if unused > 0 {
            tracing::info!(unused, "closed handed-over listeners no pod of ours needs");
        }
        block.done();
    }
    let Some(path) = s.path else { return };
    let server = match Server::bind(&path) {
        Ok(server) => server,
        Err(e) => {
            tracing::error!(
                error = %error_chain(&e),
                "cannot open the hand-over socket; an upgrade will fall back to SO_REUSEPORT"
            );
            return;
        }
    };
    tracing::info!(path = %server.path().display(), "hand-over socket ready for a successor");
    // Its own thread, not the blocking pool: it waits for a successor for as long as we run,
    // and the runtime must not wait for it on exit.
    let (registry, replaced) = (s.registry, s.replaced);
    let spawned = std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            let succession = server.serve(registry);
            let _ = replaced.send(Some(succession));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the hand-over thread; an upgrade will fall back to SO_REUSEPORT");
    }
}
