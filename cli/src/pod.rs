//! `ambitctl pod create|delete NAMESPACE/NAME`: what a node does when one pod of the local
//! mesh is scheduled to it or deleted, for a cluster `up` is running. `create` makes a pod
//! listed in the objects folder: its namespace, ADD through its node's CNI chain (so an
//! enrolled pod is captured before its app starts), then its app. `delete` stops the pod's
//! processes, runs DEL through the chain (capture rules removed, veth and addresses released)
//! and deletes its namespace. The pod's object stays in the folder: the controller keeps
//! publishing it, as the API server keeps a pod a node has not started yet.

use std::path::PathBuf;

use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use ambitctl::local::{cluster, pods};
use anyhow::{bail, Context};

/// Options of `ambitctl pod`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
    #[arg(long, default_value = DEFAULT_STATE_DIR, global = true)]
    state_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Make a pod of the objects folder (sandbox, CNI ADD, then its app).
    Create {
        /// The pod, as namespace/name.
        pod: String,
    },
    /// Remove a pod (its processes, CNI DEL, its namespace).
    Delete {
        /// The pod, as namespace/name.
        pod: String,
    },
}

fn split(pod: &str) -> anyhow::Result<(&str, &str)> {
    match pod.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns, name)),
        _ => bail!("{pod:?} is not namespace/name"),
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "ambitctl pod needs root (it makes and deletes network namespaces): run it with sudo"
        );
    }
    let mut state = ClusterState::load(&args.state_dir).context("ambitctl pod")?;
    match &args.action {
        Action::Create { pod } => {
            let (ns, name) = split(pod)?;
            let bins = cluster::Binaries::locate()?;
            let made = pods::create_pod(&mut state, &bins.ambitctl, &bins.waypoint, ns, name)
                .with_context(|| format!("ambitctl pod create {pod}"))?;
            println!(
                "created pod {pod} on {} at {} (network namespace {}){}",
                made.node,
                made.ip,
                made.netns,
                made.process
                    .map(|p| format!("; its app runs as pid {}, log {}", p.pid, p.log.display()))
                    .unwrap_or_default()
            );
        }
        Action::Delete { pod } => {
            let (ns, name) = split(pod)?;
            let gone = pods::delete_pod(&mut state, ns, name)
                .with_context(|| format!("ambitctl pod delete {pod}"))?;
            println!(
                "deleted pod {pod} from {} (CNI DEL released {}; network namespace {} removed)",
                gone.node, gone.ip, gone.netns
            );
        }
    }
    Ok(())
}
