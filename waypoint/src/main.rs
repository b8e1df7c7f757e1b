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
//! `AMBIT_LOG_FORMAT`), the same names ztunnel reads.
//!
//! State comes from the controller's discovery stream (`--controller`) or a static YAML/JSON
//! file (`--static-state`). The identity certificate comes from PEM files or from the
//! controller's CA (`--ca`, rotated at half-life without dropping connections). On SIGTERM or
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
use ambit_waypoint::admin::{Admin, Port};
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
    #[arg(long, default_value = ambit_hbone::identity::DEFAULT_TRUST_DOMAIN, env = "AMBIT_TRUST_DOMAIN")]
    trust_domain: String,
    /// Controller discovery address (https://host:15012).
    #[arg(long, env = "AMBIT_CONTROLLER", conflicts_with = "static_state")]
    controller: Option<String>,
    /// SPIFFE identity the controller must present; by default
    /// `spiffe://<trust domain>/ns/ambit-system/sa/ambit-controller`.
    #[arg(long, env = "AMBIT_CONTROLLER_IDENTITY")]
    controller_identity: Option<String>,
    /// File holding the bearer token for the controller and CA (a projected token).
    #[arg(long, env = "AMBIT_CREDENTIAL_FILE")]
    token_file: Option<PathBuf>,
    /// Static state file (YAML or JSON) instead of a controller.
    #[arg(long, env = "AMBIT_STATIC_STATE")]
    static_state: Option<PathBuf>,
    /// Certificate chain (PEM); with `--key`, instead of a CA.
    #[arg(long, requires = "key", conflicts_with = "ca")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The CA (https://host:15012); the controller's address when unset. The certificate is
    /// requested there and rotated at half-life.
    #[arg(long, env = "AMBIT_CA_ADDRESS")]
    ca: Option<String>,
    /// Requested certificate lifetime, seconds.
    #[arg(long, default_value_t = 86_400, env = "AMBIT_CERT_VALIDITY_SECONDS")]
    cert_validity_seconds: u64,
    /// Trust roots (PEM): the mesh root, also what the controller and CA must chain to.
    #[arg(long, env = "AMBIT_CA_ROOT_FILE")]
    roots: PathBuf,
    /// `json` for one JSON object per log line.
    #[arg(long, default_value = "text", env = "AMBIT_LOG_FORMAT")]
    log_format: String,
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020", env = "AMBIT_METRICS_ADDR")]
    metrics: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021", env = "AMBIT_READINESS_ADDR")]
    readiness: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000", env = "AMBIT_ADMIN_ADDR")]
    admin: SocketAddr,
    /// HBONE port of destination ztunnels.
    #[arg(long, default_value_t = 15008)]
    hbone_port: u16,
    /// OpenTelemetry collector (OTLP over gRPC, e.g. `http://otel-collector:4317`): one span
    /// per sampled request is exported there. Unset: nothing is exported.
    #[arg(long, env = "AMBIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// How long open streams may finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "AMBIT_DRAIN_SECONDS")]
    drain_seconds: u64,
}

impl Args {
    fn identity(&self) -> anyhow::Result<Identity> {
        if let Some(id) = &self.identity {
            return id.parse().context("--identity");
        }
        match (&self.pod_namespace, &self.service_account) {
            (Some(ns), Some(sa)) => Ok(Identity::new(&self.trust_domain, ns, sa)?),
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

    fn controller_identity(&self) -> anyhow::Result<Identity> {
        match &self.controller_identity {
            Some(id) => id.parse().context("--controller-identity"),
            None => Ok(Identity::new(
                &self.trust_domain,
                "ambit-system",
                "ambit-controller",
            )?),
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let identity = args.identity()?;
    let gateway = args.gateway()?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let roots_pem = read(&args.roots)?;
    let controller_identity = args.controller_identity()?;
    let token = match &args.token_file {
        Some(p) => Some(read(p)?.trim().to_string()),
        None => None,
    };
    let ca_address = args.ca.as_ref().or(args.controller.as_ref());
    let (cert, ca) = match (&args.cert, &args.key, ca_address) {
        (Some(c), Some(k), _) => (
            WorkloadCertificate::from_pem(&read(c)?, &read(k)?, &roots_pem)
                .context("loading the certificate")?,
            None,
        ),
        (_, _, Some(ca)) => {
            let config = CaConfig {
                channel: ambit_hbone::control::channel(ca, &roots_pem, &controller_identity)
                    .context("CA channel")?,
                identity: identity.clone(),
                token_file: args.token_file.clone(),
                validity: Duration::from_secs(args.cert_validity_seconds),
            };
            let cert = certs::fetch(&config).await.context("first certificate")?;
            (cert, Some(config))
        }
        _ => anyhow::bail!("give --cert and --key, or a CA (--ca or --controller)"),
    };
    anyhow::ensure!(
        cert.identity() == &identity,
        "certificate is for {}, not {identity}",
        cert.identity()
    );
    let bundle =
        TrustBundle::from_pem(identity.trust_domain(), &roots_pem).context("trust roots")?;
    let rotating = RotatingCert::new(&cert);
    if let Some(config) = ca {
        tokio::spawn(certs::rotate(config, rotating.clone(), cert.clone()));
    }

    let state = StateHandle::default();
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(path) = &args.static_state {
        let file = StateFile::load(path)?;
        state.store(State::build(file).context("static state")?);
        ready.store(true, Ordering::Release);
    } else if let Some(controller) = &args.controller {
        let config = DiscoveryConfig {
            address: controller.clone(),
            controller_identity: controller_identity.clone(),
            identity: identity.clone(),
            gateway: gateway.clone(),
            roots_pem: roots_pem.clone(),
            token: token.clone(),
        };
        tokio::spawn(discovery::run(config, state.clone(), ready.clone()));
    } else {
        anyhow::bail!("one of --controller or --static-state is required");
    }

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let upstreams = Upstreams::new(
        Pool::new(PoolConfig::default()),
        identity.clone(),
        rotating.clone(),
        bundle.clone(),
        args.hbone_port,
    );
    let mut proxy = Proxy::new(state.clone(), upstreams, metrics, gateway.clone());
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
        registry,
        state: state.clone(),
        ready: ready.clone(),
    };
    for (port, addr) in [
        (Port::Metrics, args.metrics),
        (Port::Readiness, args.readiness),
        (Port::Admin, args.admin),
    ] {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
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
