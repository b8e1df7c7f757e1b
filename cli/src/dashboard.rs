//! `ambitctl dashboard`: opens the controller's built-in dashboard (`/dashboard` on its
//! operations port, 15014) from this machine.
//!
//! Local mesh: the controller listens inside the cluster's fabric network namespace, which
//! the host cannot route to (the local mesh never touches the host's links), so this command
//! forwards a port of the host's loopback to it: each accepted connection is matched by one
//! made from inside the fabric namespace ([`net::in_netns`]), and bytes are copied both ways
//! until Ctrl-C. It prints the URL to open.
//!
//! Kubernetes: not forwarded automatically yet; the command says so and prints the
//! `kubectl port-forward` line that does it, rather than pretend.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambitctl::local::cluster::CONTROLLER_OPS_PORT;
use ambitctl::local::net;
use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use anyhow::{bail, Context};

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
    /// The mesh runs on Kubernetes (the current kubeconfig's cluster).
    #[arg(long)]
    kubernetes: bool,
    /// Namespace of the controller on Kubernetes.
    #[arg(long, default_value = "ambit-system")]
    namespace: String,
}

fn kubernetes_hint(namespace: &str, port: u16) -> String {
    format!(
        "forwarding to a controller on Kubernetes is not implemented by ambitctl yet; \
         forward it with kubectl instead:\n  kubectl -n {namespace} port-forward deploy/ambit-controller {port}:{CONTROLLER_OPS_PORT}\n\
         then open http://127.0.0.1:{port}/dashboard"
    )
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.kubernetes {
        bail!("{}", kubernetes_hint(&args.namespace, args.port));
    }
    let state = ClusterState::load(&args.state_dir).with_context(|| {
        format!(
            "no local mesh at {} (start one with `ambitctl up`). For a mesh on Kubernetes: {}",
            args.state_dir.display(),
            kubernetes_hint(&args.namespace, args.port)
        )
    })?;
    let upstream = SocketAddr::from((net::FABRIC_IP, CONTROLLER_OPS_PORT));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the port forward")?;
    runtime.block_on(forward(
        SocketAddr::new(args.address, args.port),
        state.fabric,
        upstream,
    ))
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
