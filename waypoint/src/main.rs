//! The waypoint binary. One multi-threaded tokio runtime runs everything:
//!
//! - `0.0.0.0:15008`: HBONE in (the only traffic port; see `ARCHITECTURE.md`);
//! - `0.0.0.0:15020`: Prometheus `/metrics`;
//! - `0.0.0.0:15021`: `/healthz/ready` (ready once state is loaded, not ready while draining);
//! - `127.0.0.1:15000`: admin `/config_dump`.
//!
//! Flags fall back to the environment the controller's waypoint Deployment sets
//! (`manifests/src/waypoint.rs`: `POD_NAMESPACE`, `SERVICE_ACCOUNT`, `AMBIT_WAYPOINT_NAME`,
//! `AMBIT_CONTROLLER`, `AMBIT_CA_ROOT_FILE`, `AMBIT_CREDENTIAL_FILE`, `AMBIT_TRUST_DOMAIN`,
//! `AMBIT_LOG_FORMAT`). The flags it shares with ztunnel are the same clap groups
//! (`ambit_runtime::flags`), so they have the same names and variables.
//!
//! State comes from the controller's discovery stream (`--controller`) or a static YAML/JSON
//! file (`--static-state`). The identity certificate comes from PEM files or from the
//! controller's CA (`--ca-address`, else the controller; rotated at half-life without dropping
//! connections). On SIGTERM or
//! SIGINT the waypoint turns not-ready, sends GOAWAY on its HBONE connections and lets open
//! streams finish for `--drain-seconds` before exiting.
//!
//! With `--otlp-endpoint` (`AMBIT_OTLP_ENDPOINT`) each sampled request's span is exported to
//! that OpenTelemetry collector over OTLP/gRPC, in batches from a background task; queued
//! spans are flushed (for at most 2 s) after the drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_hbone::cert::WorkloadCertificate;
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{Server, ServerSettings};
use ambit_hbone::tls::{self, RotatingCert, TrustBundle};
use ambit_hbone::Identity;
use ambit_proto::ports;
use ambit_runtime::control;
use ambit_runtime::flags::{any_addr, ControlPlaneArgs, MeshArgs, ProxyOpsArgs, RuntimeArgs};
use ambit_runtime::http::Listener;
use ambit_runtime::logging::{error_chain, LogArgs};
use ambit_waypoint::admin::{Admin, Port};
use ambit_waypoint::authn::{
    self,
    jwks::{FetchConfig, Jwks},
};
use ambit_waypoint::certs::{self, CaConfig};
use ambit_waypoint::discovery::{self, DiscoveryConfig};
use ambit_waypoint::metrics::Metrics;
use ambit_waypoint::otlp;
use ambit_waypoint::proxy::Proxy;
use ambit_waypoint::server::{Limits, Waypoint};
use ambit_waypoint::state::{State, StateFile, StateHandle};
use ambit_waypoint::upstream::Upstreams;
use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(name = "waypoint", version, about = "Ambit's L7 proxy")]
#[command(group(clap::ArgGroup::new("state").args(["controller", "static_state"])))]
struct Args {
    /// SPIFFE identity of this waypoint; by default
    /// `spiffe://<trust domain>/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT`.
    #[arg(long, env = "AMBIT_WAYPOINT_IDENTITY")]
    identity: Option<String>,
    /// `namespace/name` of this waypoint's Gateway; by default
    /// `$POD_NAMESPACE/$AMBIT_WAYPOINT_NAME`.
    #[arg(long, env = "AMBIT_WAYPOINT_GATEWAY")]
    gateway: Option<String>,
    /// The Gateway's name (the controller's Deployment sets it).
    #[arg(long, env = "AMBIT_WAYPOINT_NAME")]
    waypoint_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: Option<String>,
    #[command(flatten)]
    mesh: MeshArgs,
    #[command(flatten)]
    control: ControlPlaneArgs,
    /// Certificate chain (PEM); with `--key`, instead of a CA.
    #[arg(long, requires = "key", conflicts_with = "ca_address")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
    /// HBONE in.
    #[arg(long, default_value_t = any_addr(ports::HBONE))]
    listen: SocketAddr,
    #[command(flatten)]
    ops: ProxyOpsArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// HBONE port of destination ztunnels.
    #[arg(long, default_value_t = ports::HBONE)]
    hbone_port: u16,
    /// OpenTelemetry collector (OTLP over gRPC, e.g. `http://otel-collector:4317`): one span
    /// per sampled request is exported there. Unset: nothing is exported.
    #[arg(long, env = "AMBIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// How long open streams may finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "AMBIT_DRAIN_SECONDS")]
    drain_seconds: u64,
    /// How often a key set named by a RequestAuthentication's `jwksUri` is fetched again
    /// (a failed fetch is retried after 5 s, keeping the last good set meanwhile).
    #[arg(long, default_value_t = 1200, env = "AMBIT_JWKS_REFRESH_SECONDS")]
    jwks_refresh_seconds: u64,
}

impl Args {
    fn identity(&self) -> anyhow::Result<Identity> {
        if let Some(id) = &self.identity {
            return id.parse().context("--identity");
        }
        match (&self.pod_namespace, &self.service_account) {
            (Some(ns), Some(sa)) => Ok(Identity::new(&self.mesh.trust_domain, ns, sa)?),
            _ => anyhow::bail!("give --identity, or POD_NAMESPACE and SERVICE_ACCOUNT"),
        }
    }

    fn gateway(&self) -> anyhow::Result<String> {
        if let Some(g) = &self.gateway {
            return Ok(g.clone());
        }
        match (&self.pod_namespace, &self.waypoint_name) {
            (Some(ns), Some(name)) => Ok(format!("{ns}/{name}")),
            _ => anyhow::bail!("give --gateway, or POD_NAMESPACE and AMBIT_WAYPOINT_NAME"),
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = args
        .runtime
        .builder("waypoint")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    args.log
        .init()
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let identity = args.identity()?;
    let gateway = args.gateway()?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let roots_file = args
        .control
        .ca_root_file
        .as_ref()
        .context("give --ca-root-file: the mesh root the controller and peers chain to")?;
    let roots_pem = read(roots_file)?;
    let controller_identity = args
        .control
        .controller_identity(&args.mesh.trust_domain)
        .context("--controller-identity")?;
    let ca_address = args
        .control
        .ca_address
        .as_ref()
        .or(args.control.controller.as_ref());
    let (cert, ca) = match (&args.cert, &args.key, ca_address) {
        (Some(c), Some(k), _) => (
            WorkloadCertificate::from_pem(&read(c)?, &read(k)?, &roots_pem)
                .context("loading the certificate")?,
            None,
        ),
        (_, _, Some(ca)) => {
            let config = CaConfig {
                channel: control::channel(ca, Some(roots_file), &controller_identity)
                    .context("CA channel")?,
                identity: identity.clone(),
                token_file: args.control.credential_file.clone(),
                validity: Duration::from_secs(args.control.cert_validity_seconds),
            };
            let cert = certs::fetch(&config).await.context("first certificate")?;
            (cert, Some(config))
        }
        _ => anyhow::bail!("give --cert and --key, or a CA (--ca-address or --controller)"),
    };
    anyhow::ensure!(
        cert.identity() == &identity,
        "certificate is for {}, not {identity}",
        cert.identity()
    );
    let bundle =
        TrustBundle::from_pem(identity.trust_domain(), &roots_pem).context("trust roots")?;
    let rotating = RotatingCert::new(&cert);
    let expiry = certs::ExpiryMetric::default();
    expiry.set(&cert);
    if let Some(config) = ca {
        tokio::spawn(certs::rotate(
            config,
            rotating.clone(),
            cert.clone(),
            expiry.clone(),
        ));
    }

    let state = StateHandle::default();
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(path) = &args.control.static_state {
        let file = StateFile::load(path)?;
        state.store(State::build(file).context("static state")?);
        ready.store(true, Ordering::Release);
    } else if let Some(controller) = &args.control.controller {
        let channel = control::channel(controller, Some(roots_file), &controller_identity)
            .context("controller channel")?;
        let config = DiscoveryConfig {
            identity: identity.clone(),
            gateway: gateway.clone(),
            credential_file: args.control.credential_file.clone(),
            metrics_port: Some(args.ops.metrics_addr.port()),
        };
        let (status, _) = tokio::sync::watch::channel(Default::default());
        tokio::spawn(discovery::run(
            channel,
            config,
            state.clone(),
            ready.clone(),
            status,
        ));
    } else {
        anyhow::bail!("one of --controller or --static-state is required");
    }

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    expiry.register(&mut registry);
    let upstreams = Upstreams::new(
        Pool::new(PoolConfig::default()),
        identity.clone(),
        rotating.clone(),
        bundle.clone(),
        args.hbone_port,
    );
    let jwks = Jwks::default();
    let mut fetching = FetchConfig::new(&roots_pem).context("TLS for fetching key sets")?;
    fetching.refresh = Duration::from_secs(args.jwks_refresh_seconds.max(1));
    tokio::spawn(authn::jwks::run(state.clone(), jwks.clone(), fetching));
    let mut proxy =
        Proxy::new(state.clone(), upstreams, metrics, gateway.clone()).with_jwks(jwks.clone());
    let exporter = match &args.otlp_endpoint {
        Some(endpoint) => {
            // Named like Istio names its proxies' traces, so a trace view reads the same.
            let service = format!("waypoint.{}", gateway.replace('/', "."));
            let (sink, exporter) = otlp::start(endpoint, &service, &mut registry)?;
            proxy = proxy.with_spans(sink);
            tracing::info!(%endpoint, %service, "exporting spans over OTLP");
            Some(exporter)
        }
        None => None,
    };
    let registry = Arc::new(Mutex::new(registry));
    let admin = Admin {
        jwks: jwks.clone(),
        registry,
        state: state.clone(),
        ready: ready.clone(),
    };
    for (port, name, addr) in [
        (Port::Metrics, "metrics", args.ops.metrics_addr),
        (Port::Readiness, "readiness", args.ops.readiness_addr),
        (Port::Admin, "admin", args.ops.admin_addr),
    ] {
        let listener = Listener::bind(name, addr).await?;
        tokio::spawn(admin.clone().serve(port, listener));
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let server_tls = tls::server_config_rotating(&rotating, &bundle)?;
    let server = Server::new(
        listener,
        server_tls,
        Waypoint {
            proxy,
            limits: Limits::default(),
        },
        ServerSettings {
            drain_deadline: Duration::from_secs(args.drain_seconds),
            ..ServerSettings::default()
        },
    );
    tracing::info!(listen = %args.listen, %identity, %gateway, "waypoint serving");
    let drain_ready = ready.clone();
    server
        .run(async move {
            shutdown_signal().await;
            drain_ready.store(false, Ordering::Release);
            tracing::info!("draining");
        })
        .await;
    if let Some(exporter) = exporter {
        exporter.shutdown(Duration::from_secs(2)).await;
    }
    Ok(())
}
