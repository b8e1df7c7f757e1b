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
    if args.cluster.kubernetes {
        let runtime = cluster::runtime()?;
        return runtime.block_on(async {
            let client = cluster::client(args.cluster.kubeconfig.as_deref()).await?;
            forward_to_cluster(listen, client, &args.cluster.namespace).await
        });
    }
    let state = ClusterState::load(&args.state_dir).with_context(|| {
        format!(
            "no local mesh at {} (start one with `ambitctl up`; for a mesh on Kubernetes, add --kubernetes)",
            args.state_dir.display(),
        )
    })?;
    let upstream = SocketAddr::from((net::FABRIC_IP, CONTROLLER_OPS_PORT));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the port forward")?;
    runtime.block_on(forward(listen, state.fabric, upstream))
}

/// Serves `listen`, each connection port-forwarded to a running controller pod's 15014.
async fn forward_to_cluster(
    listen: SocketAddr,
    client: kube::Client,
    namespace: &str,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} (another port: --port)"))?;
    let local = listener
        .local_addr()
        .context("the forward's local address")?;
    println!("http://{local}/dashboard");
    std::io::stdout().flush().context("writing to stdout")?;
    eprintln!(
        "forwarding {local} to port {CONTROLLER_OPS_PORT} of a controller pod in {namespace} through the API server; Ctrl-C stops"
    );
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
        let (client, namespace) = (client.clone(), namespace.to_owned());
        tokio::spawn(async move {
            if let Err(e) = pipe_to_cluster(conn, &client, &namespace).await {
                eprintln!("ambitctl: forwarding for {peer}: {e:#}");
            }
        });
    }
}

/// Port-forwards to the first running controller pod and copies between it and `conn`.
async fn pipe_to_cluster(
    mut conn: tokio::net::TcpStream,
    client: &kube::Client,
    namespace: &str,
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let selector = format!("{}={}", cluster::NAME_LABEL, cluster::CONTROLLER);
    let pods = cluster::pods(client, namespace, &selector).await?;
    let Some(pod) = pods.iter().find_map(|p| {
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if running {
            p.metadata.name.clone()
        } else {
            None
        }
    }) else {
        bail!("no running controller pod ({selector}) in namespace {namespace}");
    };
    let mut forward = kube::Api::<Pod>::namespaced(client.clone(), namespace)
        .portforward(&pod, &[CONTROLLER_OPS_PORT])
        .await
        .with_context(|| format!("port-forwarding to {namespace}/{pod}:{CONTROLLER_OPS_PORT}"))?;
    let Some(mut upstream) = forward.take_stream(CONTROLLER_OPS_PORT) else {
        bail!("port-forward to {namespace}/{pod} gave no stream");
    };
    tokio::io::copy_bidirectional(&mut conn, &mut upstream)
        .await
        .context("copying")?;
    Ok(())
}

async fn forward(listen: SocketAddr, fabric: String, upstream: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} (another port: --port)"))?;
    let local = listener
        .local_addr()
        .context("the forward's local address")?;
    // stdout is the URL alone, so scripts (and tests) can read it; the rest is for people.
    println!("http://{local}/dashboard");
    std::io::stdout().flush().context("writing to stdout")?;
    eprintln!(
        "forwarding {local} to the controller's {upstream} in network namespace {fabric}; Ctrl-C stops"
    );
    loop {
        let (client, peer) = tokio::select! {
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
        let fabric = fabric.clone();
        tokio::spawn(async move {
            if let Err(e) = pipe(client, &fabric, upstream).await {
                eprintln!("ambitctl: forwarding for {peer}: {e:#}");
            }
        });
    }
}

/// Connects to `upstream` from inside `fabric` and copies between it and `client`.
async fn pipe(
    mut client: tokio::net::TcpStream,
    fabric: &str,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    let ns = fabric.to_owned();
    let connected = tokio::task::spawn_blocking(move || {
        net::in_netns(&ns, move || {
            std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(3))
        })
    })
    .await
    .context("the connecting thread")?
    .with_context(|| format!("entering network namespace {fabric} (needs root)"))?
    .with_context(|| format!("connecting to the controller at {upstream} in {fabric}"))?;
    connected
        .set_nonblocking(true)
        .context("making the controller connection non-blocking")?;
    let mut server =
        tokio::net::TcpStream::from_std(connected).context("registering the connection")?;
    tokio::io::copy_bidirectional(&mut client, &mut server)
        .await
        .context("copying")?;
    Ok(())
}
