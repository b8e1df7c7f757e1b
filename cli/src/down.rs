//! `ambitctl down`: remove a local cluster: its processes, its pods as a node removes them
//! (DEL through the node's CNI chain: capture rules, veth and addresses; stopping ztunnel
//! leaves pods captured), network namespaces (links, routes and iptables rules inside them go
//! along) and files, ztunnels' node directories and the nodes' CNI state included. Works from `<state-dir>/cluster.json`
//! and, when that is missing or stale (a crash), from what it finds: namespaces with our
//! prefix, the processes inside them, pidfiles.

use std::path::PathBuf;

use ambitctl::local::cluster;
use ambitctl::local::state::{DEFAULT_PREFIX, DEFAULT_STATE_DIR};
use anyhow::bail;

/// Options of `ambitctl down`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The state directory `ambitctl up` used.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Prefix of the network namespaces' names, when cluster.json is gone.
    #[arg(long, default_value = DEFAULT_PREFIX, hide = true)]
    netns_prefix: String,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ambitctl down needs root (it deletes network namespaces): run it with sudo");
    }
    let report = cluster::down(&args.state_dir, &args.netns_prefix);
    for (what, pid) in &report.stopped {
        let how = if report.killed.contains(pid) {
            "killed"
        } else {
            "stopped"
        };
        println!("{how} {what} (pid {pid})");
    }
    for pod in &report.released {
        println!("released pod {pod} (CNI DEL: capture rules, veth, addresses)");
    }
    for ns in &report.namespaces {
        println!("deleted network namespace {ns}");
    }
    for path in &report.removed {
        println!("removed {}", path.display());
    }
    if report.stopped.is_empty() && report.namespaces.is_empty() && report.removed.is_empty() {
        println!("nothing to remove (state dir {})", args.state_dir.display());
    }
    if !report.problems.is_empty() {
        bail!(
            "could not remove everything:\n  {}",
            report.problems.join("\n  ")
        );
    }
    Ok(())
}
