//! `ambit-controller`: the control plane binary.
//!
//! One tokio runtime runs everything, because the work is small and bursty: the sources
//! (the local YAML folder with `--local-dir`, else the Kubernetes watchers, both through the
//! [`Sources`] seam), the model worker (the only writer of the model), one task per
//! discovery subscriber, and the gRPC server on `--listen` (15012: discovery now, the CA
//! next, both over TLS once the CA provides certificates). SIGINT/SIGTERM stop the server;
//! a source failing for good stops the process with its error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ambit_controller::discovery::{DiscoveryOptions, DiscoveryService};
use ambit_controller::model::{ModelBuilder, ModelConfig};
use ambit_controller::server::GrpcServer;
use ambit_controller::source::kube::KubeSource;
use ambit_controller::source::local::{LocalOptions, LocalSource};
use ambit_controller::source::Sources;
use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// Ambit's control plane: computes what each proxy needs and pushes it.
#[derive(Debug, Parser)]
#[command(name = "ambit-controller", version)]
struct Args {
    /// Folder of Kubernetes-format YAML to serve (local mode). Watched for changes.
    #[arg(long, env = "AMBIT_LOCAL_DIR")]
    local_dir: Option<PathBuf>,
    /// Kubeconfig of the cluster to watch when `--local-dir` is not given; without it,
    /// in-cluster credentials are used (else `KUBECONFIG` or `~/.kube/config`).
    #[arg(long, conflicts_with = "local_dir")]
    kubeconfig: Option<PathBuf>,
    /// Address of the gRPC server (discovery and CA).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Namespace whose authorization policies apply to the whole mesh.
    #[arg(long, default_value = "ambit-system")]
    root_namespace: String,
    /// DNS suffix of service host names.
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
    /// PEM file of root certificates proxies must trust (sent with every full state).
    #[arg(long)]
    trust_roots: Option<PathBuf>,
    /// Log output format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
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

async fn run(args: Args) -> anyhow::Result<()> {
    let config = ModelConfig {
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
        domain_suffix: args.domain_suffix,
    };
    let trust_roots = match &args.trust_roots {
        Some(p) => read_trust_roots(p)?,
        None => Vec::new(),
    };

    let mut sources = Sources::new();
    match &args.local_dir {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--local-dir {}: not a directory", dir.display());
            }
            sources.add(LocalSource::new(dir, LocalOptions::default()));
        }
        None => {
            let source = KubeSource::connect(args.kubeconfig.as_deref())
                .await
                .context("starting the Kubernetes source")?;
            sources.add(source);
        }
    }
    let mut model = ModelBuilder::new(config);
    let mut source_tasks = sources.spawn(&mut model);
    let model = model.spawn();

    let (_roots_tx, roots_rx) = tokio::sync::watch::channel(Arc::new(trust_roots));
    let discovery = DiscoveryService::new(model, roots_rx, DiscoveryOptions::default());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "discovery serving (plaintext until the CA provides certificates)");
    let server = GrpcServer::new(discovery).serve(listener, shutdown_signal());

    tokio::select! {
        r = server => r.context("gRPC server")?,
        Some(r) = source_tasks.join_next() => {
            r.context("source task panicked")?.context("source failed")?;
            bail!("a source stopped unexpectedly");
        }
    }
    tracing::info!("shut down");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}
