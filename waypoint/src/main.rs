//! The waypoint binary. One multi-threaded tokio runtime runs everything:
//!
//! - `0.0.0.0:15008`: HBONE in (the only traffic port; see `ARCHITECTURE.md`);
//! - `0.0.0.0:15020`: Prometheus `/metrics`;
//! - `0.0.0.0:15021`: `/healthz/ready` (ready once state is loaded, not ready while draining);
//! - `127.0.0.1:15000`: admin `/config_dump`.
//!
//! State comes from the controller's discovery stream (`--controller`) or a static YAML/JSON
//! file (`--static-state`). The identity certificate comes from PEM files or from the
//! controller's CA (`--ca`, rotated at half-life without dropping connections). On SIGTERM or
//! SIGINT the waypoint turns not-ready, sends GOAWAY on its HBONE connections and lets open
//! streams finish for `--drain-seconds` before exiting.

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
use ambit_waypoint::proxy::Proxy;
use ambit_waypoint::server::{Limits, Waypoint};
use ambit_waypoint::state::{State, StateFile, StateHandle};
use ambit_waypoint::upstream::Upstreams;
use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(about = "Ambit's L7 proxy")]
struct Args {
    /// SPIFFE identity of this waypoint (must match the certificate).
    #[arg(long, env = "WAYPOINT_IDENTITY")]
    identity: String,
    /// `namespace/name` of this waypoint's Gateway.
    #[arg(long, env = "WAYPOINT_GATEWAY")]
    gateway: String,
    /// Controller discovery address (https://host:15012).
    #[arg(long, env = "WAYPOINT_CONTROLLER", conflicts_with = "static_state")]
    controller: Option<String>,
    /// SPIFFE identity the controller must present.
    #[arg(
        long,
        default_value = "spiffe://cluster.local/ns/ambit-system/sa/ambit-controller"
    )]
    controller_identity: String,
    /// File holding the bearer token for the controller (a projected service account token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Static state file (YAML or JSON) instead of a controller.
    #[arg(long)]
    static_state: Option<PathBuf>,
    /// Certificate chain (PEM); with `--key`, instead of `--ca`.
    #[arg(long, requires = "key", conflicts_with = "ca")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The controller's CA (https://host:15012): the certificate is requested there and
    /// rotated at half-life.
    #[arg(long, env = "WAYPOINT_CA")]
    ca: Option<String>,
    /// Requested certificate lifetime, seconds.
    #[arg(long, default_value_t = 86_400)]
    cert_validity_seconds: u64,
    /// Trust roots (PEM): the mesh root, also what the controller and CA must chain to.
    #[arg(long)]
    roots: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// HBONE port of destination ztunnels.
    #[arg(long, default_value_t = 15008)]
    hbone_port: u16,
    /// How long open streams may finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let identity: Identity = args.identity.parse().context("--identity")?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let roots_pem = read(&args.roots)?;
    let controller_identity: Identity = args
        .controller_identity
        .parse()
        .context("--controller-identity")?;
    let token = match &args.token_file {
        Some(p) => Some(read(p)?.trim().to_string()),
        None => None,
    };
    let (cert, ca) = match (&args.cert, &args.key, &args.ca) {
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
        _ => anyhow::bail!("give --cert and --key, or --ca"),
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
            gateway: args.gateway.clone(),
            roots_pem: roots_pem.clone(),
            token: token.clone(),
        };
        tokio::spawn(discovery::run(config, state.clone(), ready.clone()));
    } else {
        anyhow::bail!("one of --controller or --static-state is required");
    }

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let upstreams = Upstreams::new(
        Pool::new(PoolConfig::default()),
        identity.clone(),
        rotating.clone(),
        bundle.clone(),
        args.hbone_port,
    );
    let proxy = Proxy::new(state.clone(), upstreams, metrics, args.gateway.clone());
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
    tracing::info!(listen = %args.listen, %identity, gateway = %args.gateway, "waypoint serving");
    let drain_ready = ready.clone();
    server
        .run(async move {
            shutdown_signal().await;
            drain_ready.store(false, Ordering::Release);
            tracing::info!("draining");
        })
        .await;
    Ok(())
}
