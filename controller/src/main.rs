//! `ambit-controller`: the control plane binary.
//!
//! One tokio runtime runs everything, because the work is small and bursty: the sources
//! (the local YAML folder with `--local-dir`, else the Kubernetes watchers, both through the
//! [`Sources`] seam), the model worker (the only writer of the model), one task per
//! discovery subscriber, the gRPC server on `--listen` (15012: discovery and the CA, over
//! TLS with the controller's own certificate from its CA), and the operations endpoint on
//! `--ops-listen` (15014: metrics, readiness, the dashboard) with the dashboard's
//! scraper of the proxies' metrics. The one exception is the local source's
//! reading and parsing of its folder: that runs on a thread of its own, because its cost
//! depends on what someone put in the folder and must never stall the serving tasks; each
//! file is also held to `--local-max-file-bytes` and `--local-max-yaml-depth` before it is
//! parsed (`source::limits`). SIGINT/SIGTERM stop accepting, end every
//! discovery stream cleanly and exit 0 (after at most [`DRAIN_DEADLINE`]); a source
//! failing for good stops the process with its error.
//!
//! High availability: several replicas may run side by side. Every replica serves
//! discovery and the CA; one, the leader ([`leader`]: a Lease on Kubernetes, a lock file in
//! `--state-dir` in local mode), does the writes: on Kubernetes the CA Secret (followers
//! wait for it and load it), the trust-root ConfigMap and the waypoint objects; in local
//! mode the generated root and the node credentials at start (followers load them) and the
//! leader record `<state-dir>/leader`. Leadership lost stops the writes at once.
//!
//! Callers authenticate with bearer tokens: in local mode, node credentials issued at
//! start under `<state-dir>/credentials/` (one per `--nodes` entry); in Kubernetes mode,
//! projected service-account tokens checked with TokenReview. Proxies verify the
//! controller against the mesh root, written to `<state-dir>/ca/root-cert.pem` (and, in
//! Kubernetes mode, to the `ambit-root-cert` ConfigMap; a generated root is kept in the
//! `ambit-ca` Secret there).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_controller::ca::kube_store;
use ambit_controller::ca::store::CaFiles;
use ambit_controller::ca::{AuthConfig, Security, SecurityConfig};
use ambit_controller::dashboard::{Dashboard, DashboardOptions};
use ambit_controller::discovery::{DiscoveryOptions, DiscoveryService};
use ambit_controller::leader::{self, ElectionConfig, FileElector, Leadership, LeaseElector};
use ambit_controller::model::{ModelBuilder, ModelConfig};
use ambit_controller::ops::{Ops, Readiness};
use ambit_controller::server::GrpcServer;
use ambit_controller::source::kube::KubeSource;
use ambit_controller::source::limits::{
    InputLimits, DEFAULT_MAX_DEPTH, DEFAULT_MAX_FILE_BYTES, MAX_DEPTH_LIMIT,
};
use ambit_controller::source::local::{LocalOptions, LocalSource};
use ambit_controller::source::Sources;
use ambit_controller::waypoints::WaypointDeployer;
use ambit_proto::ports;
use ambit_runtime::flags::{any_addr, MeshArgs, DEFAULT_CERT_VALIDITY_SECONDS};
use ambit_runtime::http::Listener;
use ambit_runtime::logging::{error_chain, LogArgs};
use anyhow::{bail, Context};
use clap::Parser;

/// Ambit's control plane: computes what each proxy needs and pushes it.
#[derive(Debug, Parser)]
#[command(name = "ambit-controller", version)]
struct Args {
    /// Folder of Kubernetes-format YAML to serve (local mode). Watched for changes.
    #[arg(long, env = "AMBIT_LOCAL_DIR")]
    local_dir: Option<PathBuf>,
    /// Local mode: largest file of the folder that is read, in bytes. A larger file is
    /// refused (reported with its path; its last good objects stay in force).
    #[arg(long, env = "AMBIT_LOCAL_MAX_FILE_BYTES", default_value_t = DEFAULT_MAX_FILE_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    local_max_file_bytes: u64,
    /// Local mode: deepest nesting of collections a file may have; a deeper file is
    /// refused before it is parsed.
    #[arg(long, env = "AMBIT_LOCAL_MAX_YAML_DEPTH", default_value_t = DEFAULT_MAX_DEPTH, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_DEPTH_LIMIT as u64))]
    local_max_yaml_depth: usize,
    /// Kubeconfig of the cluster to watch when `--local-dir` is not given; without it,
    /// in-cluster credentials are used (else `KUBECONFIG` or `~/.kube/config`).
    #[arg(long, conflicts_with = "local_dir")]
    kubeconfig: Option<PathBuf>,
    /// Address of the gRPC server (discovery and CA).
    #[arg(long, default_value_t = any_addr(ports::DISCOVERY))]
    listen: SocketAddr,
    #[command(flatten)]
    mesh: MeshArgs,
    /// Namespace whose authorization policies apply to the whole mesh, and whose
    /// PeerAuthentication without selector is the mesh-wide mTLS mode; also the
    /// controller's own namespace (its identity is `ns/<this>/sa/ambit-controller`).
    #[arg(long, env = "AMBIT_NAMESPACE", default_value = "ambit-system")]
    root_namespace: String,
    /// DNS suffix of service host names.
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
    /// PEM file of extra root certificates proxies must trust besides the CA's own (sent
    /// with every full state), e.g. while migrating to a new root.
    #[arg(long)]
    trust_roots: Option<PathBuf>,
    /// Address of the operations endpoint (metrics, readiness).
    #[arg(long, default_value_t = any_addr(ports::CONTROLLER_OPS))]
    ops_listen: SocketAddr,
    /// Directory of the controller's state: a generated root (`ca/`), the trust root
    /// proxies use (`ca/root-cert.pem`), local node credentials (`credentials/`).
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/tmp/ambit-controller")]
    state_dir: PathBuf,
    /// PEM file of the CA certificate to sign with (then, optionally, its chain up to the
    /// root). Without it the controller generates a root and keeps it in `--state-dir`.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// PKCS#8 PEM file of that certificate's key.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// PEM file of the certificates above `--ca-cert` up to the root.
    #[arg(long, requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// Directory of a mounted CA Secret (`ca.crt`, `ca.key`), used when it holds them and
    /// `--ca-cert` is not given.
    #[arg(long, env = "AMBIT_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Lifetime of issued certificates, in seconds (callers may ask for less).
    #[arg(long, default_value_t = DEFAULT_CERT_VALIDITY_SECONDS, env = "AMBIT_CERT_VALIDITY_SECONDS", alias = "cert-validity-secs", value_parser = clap::value_parser!(u64).range(60..))]
    cert_validity_seconds: u64,
    /// Local mode: nodes to issue credentials for (`<state-dir>/credentials/<node>.token`).
    #[arg(long, env = "AMBIT_NODES", value_delimiter = ',')]
    nodes: Vec<String>,
    /// Local mode: waypoint identities (`namespace/service-account`) to issue credentials
    /// for (`<state-dir>/credentials/serviceaccounts/<ns>/<sa>.token`).
    #[arg(long, value_delimiter = ',')]
    waypoint_service_accounts: Vec<String>,
    /// Kubernetes mode: the audience CA tokens are projected for.
    #[arg(long, env = "AMBIT_TOKEN_AUDIENCE", default_value = "ambit-ca")]
    token_audience: String,
    /// Kubernetes mode: the ztunnel ServiceAccount (in the controller's namespace), whose
    /// tokens stand for the node their pod runs on.
    #[arg(long, default_value = "ambit-ztunnel")]
    ztunnel_service_account: String,
    /// Kubernetes mode: the waypoint image; with it, every Gateway of class
    /// `ambit-waypoint` is deployed as a waypoint (ServiceAccount, Deployment, Service).
    #[arg(long, env = "AMBIT_WAYPOINT_IMAGE")]
    waypoint_image: Option<String>,
    /// Kubernetes mode: the controller's address as waypoints reach it (default
    /// `https://ambit-controller.<namespace>.svc:15012`).
    #[arg(long)]
    controller_address: Option<String>,
    /// Time between two scrapes of the proxies' metrics for the dashboard (`/dashboard`
    /// on the operations port), in milliseconds; rates are over the last six scrapes.
    #[arg(long, env = "AMBIT_DASHBOARD_SCRAPE_INTERVAL_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..))]
    dashboard_scrape_interval_ms: u64,
    /// This replica's name in the leader election (the Lease's holder, the local leader
    /// record); default: `$POD_NAME`, else the host name and process id.
    #[arg(long, env = "POD_NAME")]
    leader_identity: Option<String>,
    /// Kubernetes mode: how long followers wait after the Lease last changed before taking
    /// it over, in seconds.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    lease_duration_seconds: u64,
    /// Kubernetes mode: how long the leader keeps leading without renewing the Lease, in
    /// seconds (shorter than `--lease-duration-seconds`).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    renew_deadline_seconds: u64,
    /// Kubernetes mode: how often each replica tries to acquire or renew the Lease, in
    /// seconds (shorter than `--renew-deadline-seconds`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    retry_period_seconds: u64,
    #[command(flatten)]
    log: LogArgs,
}

impl Args {
    /// The Lease election's timing, checked so that a leader always stops before a
    /// follower may start.
    fn election(&self) -> anyhow::Result<ElectionConfig> {
        if self.renew_deadline_seconds >= self.lease_duration_seconds
            || self.retry_period_seconds >= self.renew_deadline_seconds
        {
            bail!(
                "leader election needs --retry-period-seconds ({}) < --renew-deadline-seconds ({}) < --lease-duration-seconds ({})",
                self.retry_period_seconds,
                self.renew_deadline_seconds,
                self.lease_duration_seconds
            );
        }
        let identity = self.leader_identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "ambit-controller".to_string());
            format!("{host}-{}", std::process::id())
        });
        Ok(ElectionConfig {
            identity,
            lease_duration: Duration::from_secs(self.lease_duration_seconds),
            renew_deadline: Duration::from_secs(self.renew_deadline_seconds),
            retry_period: Duration::from_secs(self.retry_period_seconds),
        })
    }
}

/// Splits a PEM bundle into its certificates, each as its own PEM string.
fn read_trust_roots(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading trust roots {}", path.display()))?;
    let mut roots = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.starts_with("-----BEGIN ") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END ") {
            roots.push(std::mem::take(&mut current));
        }
    }
    if roots.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(roots)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Local mode: sets up the CA as the leader (generating the root and issuing the node
/// credentials) or, while another live controller leads over the same state directory, as
/// a follower that loads what that leader wrote once its record says it is done.
async fn local_security(
    config: SecurityConfig,
    leadership: &Leadership,
) -> Result<Security, ambit_controller::ca::setup::SetupError> {
    let mut waited = false;
    loop {
        if leadership.is_leader() {
            return Security::start(config);
        }
        if FileElector::current(&config.state_dir).is_some_and(|(_, pid)| pid != std::process::id())
        {
            return Security::start_following(config);
        }
        if !waited {
            tracing::info!(
                "following: waiting for the leading controller to issue the credentials"
            );
            waited = true;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = leadership.acquired() => {}
        }
    }
}

/// Kubernetes mode: what the leader writes during its term. The trust-root ConfigMap is
/// applied (retried until it is), then waypoints are deployed for Gateways until the term
/// ends (the task is aborted then).
async fn leader_writes(
    client: kube::Client,
    namespace: String,
    roots_pem: String,
    waypoints: Option<WaypointDeployer>,
) {
    loop {
        match kube_store::publish_roots(client.clone(), &namespace, &roots_pem).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "publishing the trust root; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    match waypoints {
        Some(deployer) => deployer.run().await,
        None => std::future::pending().await,
    }
}

/// How long a shutdown may take before the process exits anyway.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The plugged-in CA's files, from `--ca-cert` or a mounted `--ca-dir`.
fn ca_files(args: &Args) -> Option<CaFiles> {
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        return Some(CaFiles {
            cert: cert.clone(),
            key: key.clone(),
            chain: args.ca_chain.clone(),
        });
    }
    let dir = args.ca_dir.as_ref()?;
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    (cert.exists() && key.exists()).then_some(CaFiles {
        cert,
        key,
        chain: None,
    })
}

async fn auth_config(args: &Args) -> anyhow::Result<AuthConfig> {
    if args.local_dir.is_some() {
        if args.nodes.is_empty() {
            tracing::warn!(
                "local mode without --nodes: no node credentials, so no ztunnel can authenticate"
            );
        }
        let workloads = args
            .waypoint_service_accounts
            .iter()
            .map(|s| {
                let (ns, sa) = s.split_once('/').with_context(|| {
                    format!("--waypoint-service-accounts {s:?}: expected namespace/name")
                })?;
                ambit_hbone::Identity::new(&args.mesh.trust_domain, ns, sa)
                    .with_context(|| format!("--waypoint-service-accounts {s:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        return Ok(AuthConfig::Local {
            nodes: args.nodes.clone(),
            workloads,
        });
    }
    let config = ambit_controller::source::kube::client_config(args.kubeconfig.as_deref())
        .await
        .context("Kubernetes client for TokenReview")?;
    Ok(AuthConfig::Kubernetes {
        client: kube::Client::try_from(config).context("Kubernetes client for TokenReview")?,
        audience: args.token_audience.clone(),
        ztunnel_service_account: (
            args.root_namespace.clone(),
            args.ztunnel_service_account.clone(),
        ),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut sources = Sources::new();
    let mut local_errors = None;
    match &args.local_dir {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--local-dir {}: not a directory", dir.display());
            }
            let options = LocalOptions {
                limits: InputLimits {
                    max_file_bytes: args.local_max_file_bytes,
                    max_depth: args.local_max_yaml_depth,
                },
                ..LocalOptions::default()
            };
            let source = LocalSource::new(dir, options);
            local_errors = Some(source.errors());
            sources.add(source);
        }
        None => {
            let source = KubeSource::connect(args.kubeconfig.as_deref())
                .await
                .context("starting the Kubernetes source")?;
            sources.add(source);
        }
    }
    let auth = auth_config(&args).await?;
    let kube_client = match &auth {
        AuthConfig::Kubernetes { client, .. } => Some(client.clone()),
        AuthConfig::Local { .. } => None,
    };
    let election = args.election()?;
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let security_config = SecurityConfig {
        state_dir: args.state_dir.clone(),
        trust_domain: args.mesh.trust_domain.clone(),
        namespace: args.root_namespace.clone(),
        ca_files: ca_files(&args),
        cert_validity: Duration::from_secs(args.cert_validity_seconds),
        auth,
    };
    // Elect first: what this replica may write at start depends on it.
    let (leadership, elector) = match &kube_client {
        Some(client) => {
            let (leadership, task) =
                LeaseElector::new(client.clone(), &args.root_namespace, election.clone())
                    .spawn(closing.clone());
            (leadership, Some(task))
        }
        None => (
            FileElector::new(&args.state_dir, &election.identity)
                .spawn()
                .context("leader election")?,
            None,
        ),
    };
    let security = match (&kube_client, &security_config.ca_files) {
        // Kubernetes mode without a plugged-in CA: the root lives in the `ambit-ca` Secret,
        // since the pod's state directory does not survive a restart; the leader stores it.
        (Some(client), None) => {
            let (ca, origin) = kube_store::load_when_led(
                client.clone(),
                &args.root_namespace,
                &args.mesh.trust_domain,
                &leadership,
                election.retry_period,
            )
            .await
            .context("loading the CA from its Secret")?;
            Security::from_ca(security_config, ca, origin)
        }
        (Some(_), Some(_)) => Security::start(security_config),
        (None, _) => local_security(security_config, &leadership).await,
    }
    .context("setting up the CA")?;
    // The leader's writes, started with each term and stopped the moment it ends.
    let _writes = match &kube_client {
        Some(client) => {
            let waypoints = args.waypoint_image.as_ref().map(|image| {
                let address = args.controller_address.clone().unwrap_or_else(|| {
                    format!("https://ambit-controller.{}.svc:15012", args.root_namespace)
                });
                WaypointDeployer::new(client.clone(), image, &args.mesh.trust_domain, &address)
            });
            let (client, namespace) = (client.clone(), args.root_namespace.clone());
            let roots = security.roots_pem().concat();
            AbortOnDrop(tokio::spawn(leader::while_leader(
                leadership.clone(),
                "writes",
                move || {
                    leader_writes(
                        client.clone(),
                        namespace.clone(),
                        roots.clone(),
                        waypoints.clone(),
                    )
                },
            )))
        }
        None => {
            let (state_dir, identity) = (args.state_dir.clone(), election.identity.clone());
            AbortOnDrop(tokio::spawn(leader::while_leader(
                leadership.clone(),
                "leader record",
                move || {
                    let (state_dir, identity) = (state_dir.clone(), identity.clone());
                    async move {
                        if let Err(e) = FileElector::write_record(&state_dir, &identity) {
                            tracing::warn!(error = %error_chain(&e), "leader record");
                        }
                    }
                },
            )))
        }
    };
    tracing::info!(origin = ?security.origin, identity = %security.identity, roots = %args.state_dir.join(ambit_controller::ca::store::ROOT_CERT_FILE).display(), "CA ready");
    let mut trust_roots = security.roots_pem();
    if let Some(p) = &args.trust_roots {
        trust_roots.extend(read_trust_roots(p)?);
    }
    let config = ModelConfig {
        trust_domain: args.mesh.trust_domain,
        root_namespace: args.root_namespace,
        domain_suffix: args.domain_suffix,
    };

    let mut model = ModelBuilder::new(config);
    let mut source_tasks = sources.spawn(&mut model);
    let model = model.spawn();

    let readiness = Readiness::new(model.clone());
    readiness.set_ca_loaded();
    let (_roots_tx, roots_rx) = tokio::sync::watch::channel(Arc::new(trust_roots));
    let discovery = DiscoveryService::new(model.clone(), roots_rx, DiscoveryOptions::default())
        .with_authenticator(security.authenticator.clone())
        .with_shutdown(closing.clone());
    let mut ops = Ops::new(discovery.registry(), &security.metrics, readiness.clone())
        .with_leadership(&leadership);
    if let Some(errors) = local_errors {
        ops = ops.with_source_errors(errors);
    }
    let dashboard = Dashboard::spawn(
        discovery.registry(),
        DashboardOptions {
            interval: Duration::from_millis(args.dashboard_scrape_interval_ms),
            ..DashboardOptions::default()
        },
    );
    ops = ops.with_dashboard(dashboard);
    let mut server = GrpcServer::new(discovery).with_tls(security.tls.clone());
    server
        .routes_mut()
        .add_service(security.ca_service(model).into_server());

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let ops_listener = Listener::bind("ops", args.ops_listen).await?;
    readiness.set_listening();
    tracing::info!(listen = %args.listen, ops = %args.ops_listen, "serving discovery and the CA over TLS");
    let closed = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|c| *c).await;
    };
    let mut server = tokio::spawn(server.serve(listener, closed(closing.clone())));
    let mut ops = tokio::spawn(ops.serve(ops_listener, closing));

    tokio::select! {
        () = shutdown_signal() => tracing::info!("shutting down"),
        r = &mut server => {
            r.context("gRPC server task")?.context("gRPC server")?;
            bail!("the gRPC server stopped unexpectedly");
        }
        r = &mut ops => {
            r.context("operations endpoint task")?;
            bail!("the operations endpoint stopped unexpectedly");
        }
        Some(r) = source_tasks.join_next() => {
            r.context("source task panicked")?.context("source failed")?;
            bail!("a source stopped unexpectedly");
        }
    }
    // Stop accepting, end every push stream, let in-flight requests finish.
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        let _ = server.await;
        let _ = ops.await;
        // The elector releases the Lease on `closing`, so the next leader need not wait.
        if let Some(elector) = elector {
            let _ = elector.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(deadline = ?DRAIN_DEADLINE, "connections still open at the drain deadline; exiting anyway");
    }
    tracing::info!("shut down");
    Ok(())
}

// mimalloc rather than glibc's malloc, for CPU: under churn at 10,000 pods a third of the
// controller's profile (perf record -g during target/release/controller_scale) was glibc's
// malloc and free (_int_malloc, malloc_consolidate, unlink_chunk): every change re-derives
// and re-diffs thousands of small messages. The same build as ztunnel's (version 2, no
// transparent huge pages); see ARCHITECTURE.md for the figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // stderr, as the controller always logged; stdout stays free.
    args.log
        .init_stderr()
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}
