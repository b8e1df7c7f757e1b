//! `ambitctl upgrade NODE [--binary PATH]`: replace one node's ztunnel in the local mesh
//! live. The new process takes the running one's listening sockets over the node directory's
//! hand-over socket (or, if that fails, binds beside them with SO_REUSEPORT), and once it
//! serves, the old one stops accepting and exits by itself when its last connection ends: no
//! connection is refused or reset. This command returns when the new ztunnel serves.

use std::path::PathBuf;

use ambitctl::local::cluster;
use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use anyhow::{bail, Context};

/// Options of `ambitctl upgrade`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node whose ztunnel to replace (e.g. node1).
    node: String,
    /// The ztunnel executable to run (default: the one next to ambitctl).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Skip the hand-over of listening sockets and use the SO_REUSEPORT fallback (to try it).
    #[arg(long)]
    reuseport: bool,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ambitctl upgrade needs root (it starts ztunnel inside a node's network namespace): run it with sudo");
    }
    let mut state = ClusterState::load(&args.state_dir).context("ambitctl upgrade")?;
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => cluster::Binaries::locate()?.ztunnel,
    };
    let extra: Vec<String> = if args.reuseport {
        vec!["--handover".into(), "reuseport".into()]
    } else {
        Vec::new()
    };
    let done = cluster::upgrade(&mut state, &args.node, &binary, &extra)
        .with_context(|| format!("ambitctl upgrade {}", args.node))?;
    println!(
        "ztunnel on {} replaced in {} ms: now pid {} ({})",
        done.node,
        done.took.as_millis(),
        done.new_pid,
        done.binary.display()
    );
    match done.old_pid {
        Some(old) => println!(
            "the previous ztunnel (pid {old}) no longer accepts; it exits once its open connections end \
             (at most its --upgrade-drain-seconds, an hour by default). Log: {}",
            done.log.display()
        ),
        None => println!("no previous ztunnel was running. Log: {}", done.log.display()),
    }
    Ok(())
}
