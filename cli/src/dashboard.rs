//! `ambitctl dashboard`: opens the controller's built-in dashboard (`/dashboard` on its
//! operations port, 15014) from this machine.
//!
//! Local mesh: the controller listens inside the cluster's fabric network namespace, which
//! the host cannot route to (the local mesh never touches the host's links), so this command
//! forwards a port of the host's loopback to it: each accepted connection is matched by one
//! made from inside the fabric namespace ([`net::in_netns`]), and bytes are copied both ways
//! until Ctrl-C. It prints the URL to open.
//!
//! Kubernetes (`--kubernetes`): the same loopback port, each accepted connection matched by a
//! port-forward through the API server to port 15014 of a running controller pod (any
//! replica serves the dashboard), as `kubectl port-forward` does; nothing is exposed.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambitctl::local::cluster::CONTROLLER_OPS_PORT;
use ambitctl::local::net;
use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use anyhow::{bail, Context};

use crate::cluster;

/// Options of `ambitctl dashboard`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Local port to serve the dashboard on (0: any free port; the URL printed names it).
    #[arg(long, default_value_t = CONTROLLER_OPS_PORT)]
    port: u16,
    /// Local address to listen on (loopback by default: the dashboard has no login).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    address: IpAddr,
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let listen = SocketAddr::new(args.address, args.port);
    let runtime = cluster::runtime()?;
    if args.cluster.kubernetes {
        return runtime.block_on(async {
            let client = cluster::client(args.cluster.kubeconfig.as_deref()).await?;
            let namespace = args.cluster.namespace.clone();
            forward(listen, Upstream::Cluster { client, namespace }).await
        });
    }
    let state = ClusterState::load(&args.state_dir).with_context(|| {
        format!(
            "no local mesh at {} (start one with `ambitctl up`; for a mesh on Kubernetes, add --kubernetes)",
            args.state_dir.display(),
        )
    })?;
    let upstream = Upstream::Fabric {
        netns: state.fabric,
        addr: SocketAddr::from((net::FABRIC_IP, CONTROLLER_OPS_PORT)),
    };
    runtime.block_on(forward(listen, upstream))
}

/// Where each forwarded connection goes.
enum Upstream {
    /// The local mesh's controller, dialled from inside the fabric namespace `netns`.
    Fabric { netns: String, addr: SocketAddr },
    /// A running controller pod's operations port, through the API server's port-forward.
    Cluster {
        client: kube::Client,
        namespace: String,
    },
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Fabric { netns, addr } => {
                write!(f, "the controller's {addr} in network namespace {netns}")
            }
            Upstream::Cluster { namespace, .. } => write!(
                f,
                "port {CONTROLLER_OPS_PORT} of a controller pod in {namespace} through the API server"
            ),
        }
    }
}

impl Upstream {
    /// Opens a connection to the controller and copies between it and `conn` until both end.
    async fn pipe(&self, mut conn: tokio::net::TcpStream) -> anyhow::Result<()> {
        match self {
            Upstream::Fabric { netns, addr } => {
                let mut server = dial_in_netns(netns, *addr).await?;
                tokio::io::copy_bidirectional(&mut conn, &mut server).await
            }
            Upstream::Cluster { client, namespace } => {
                let pod = running_controller(client, namespace).await?;
                let mut forward = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(
                    client.clone(),
                    namespace,
                )
                .portforward(&pod, &[CONTROLLER_OPS_PORT])
                .await
                .with_context(|| {
                    format!("port-forwarding to {namespace}/{pod}:{CONTROLLER_OPS_PORT}")
                })?;
                let Some(mut server) = forward.take_stream(CONTROLLER_OPS_PORT) else {
                    bail!("port-forward to {namespace}/{pod} gave no stream");
                };
                tokio::io::copy_bidirectional(&mut conn, &mut server).await
            }
        }
        .context("copying")?;
        Ok(())
    }
}

/// Serves `listen` until Ctrl-C, each accepted connection piped to `upstream`.
async fn forward(listen: SocketAddr, upstream: Upstream) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} (another port: --port)"))?;
    let local = listener
        .local_addr()
        .context("the forward's local address")?;
    // stdout is the URL alone, so scripts (and tests) can read it; the rest is for people.
    println!("http://{local}/dashboard");
    std::io::stdout().flush().context("writing to stdout")?;
    eprintln!("forwarding {local} to {upstream}; Ctrl-C stops");
    let upstream = std::sync::Arc::new(upstream);
    loop {
        let (conn, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("ambitctl: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = upstream.pipe(conn).await {
                eprintln!("ambitctl: forwarding for {peer}: {e:#}");
            }
        });
    }
}

/// The name of the first running controller pod in `namespace`.
async fn running_controller(client: &kube::Client, namespace: &str) -> anyhow::Result<String> {
    let selector = format!("{}={}", cluster::NAME_LABEL, cluster::CONTROLLER);
    let pods = cluster::pods(client, namespace, &selector).await?;
    pods.iter()
        .find(|p| cluster::running(p))
        .and_then(|p| p.metadata.name.clone())
        .with_context(|| format!("no running controller pod ({selector}) in namespace {namespace}"))
}

/// Connects to `addr` from inside network namespace `netns`.
async fn dial_in_netns(netns: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let ns = netns.to_owned();
    let connected = tokio::task::spawn_blocking(move || {
        net::in_netns(&ns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        })
    })
    .await
    .context("the connecting thread")?
    .with_context(|| format!("entering network namespace {netns} (needs root)"))?
    .with_context(|| format!("connecting to the controller at {addr} in {netns}"))?;
    connected
        .set_nonblocking(true)
        .context("making the controller connection non-blocking")?;
    tokio::net::TcpStream::from_std(connected).context("registering the connection")
}
