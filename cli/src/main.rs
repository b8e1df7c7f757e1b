//! `ambitctl`: install Ambit on Kubernetes, run a whole mesh on one machine, inspect proxies.
//!
//! A clap dispatcher with one module per subcommand; each module owns its `Args` and its `run`.
//! `install` (alias `render`) and `crds` only print manifests and never talk to a cluster. The
//! local-mode subcommands (`up`, `down`, `status`, `proxy-config`, `explain`, `apply`,
//! `upgrade`, `pod`, `dashboard`, and the hidden
//! `sample` app) run a mesh on this machine; their shared parts are the library's
//! `ambitctl::local`. `check` looks at a node before install, or at an installed mesh: the
//! local one, or a cluster through its API server. `status`, `proxy-config` and `check` read
//! a cluster with `--kubernetes`, through the API server's port-forward to the pods' ops
//! ports (`cluster`).

mod apply;
mod check;
mod cluster;
mod crds;
mod dashboard;
mod down;
mod explain;
mod install;
mod output;
mod pod;
mod proxy_config;
mod sample;
mod status;
mod up;
mod upgrade;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ambit's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "ambitctl", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the Kubernetes manifests that install Ambit (pipe them to `kubectl apply -f -`).
    ///
    /// Never talks to a cluster: this is always a dry run, the output is the whole effect.
    #[command(visible_alias = "render")]
    Install(install::Args),
    /// Print only Ambit's CustomResourceDefinitions.
    Crds(crds::Args),
    /// Run a whole mesh on this machine: nodes and pods as network namespaces (root, Linux).
    Up(up::Args),
    /// Remove a local mesh made by `up` (also after a crash).
    Down(down::Args),
    /// Replace one node's ztunnel in the local mesh live, without resetting a connection.
    Upgrade(upgrade::Args),
    /// Health of the mesh (local, or `--kubernetes`): controller and each node's ztunnel.
    Status(status::Args),
    /// What one node's ztunnel holds: workloads, services, policies, certificates (local, or
    /// `--kubernetes`).
    ProxyConfig(proxy_config::Args),
    /// Why a connection or request from a pod to a destination is allowed or denied: runs
    /// the proxies' own decisions on their live state and names the deciding rule.
    Explain(explain::Args),
    /// Open the controller's dashboard: forwards it to this machine's loopback and prints
    /// the URL (local mesh; on Kubernetes, prints the port-forward to run).
    Dashboard(dashboard::Args),
    /// Check a node before install (`--pre`), or an installed mesh (local, or `--kubernetes`):
    /// each failure says what is wrong and what to do; exits non-zero if any check failed.
    Check(check::Args),
    /// Check a YAML file and add it to the local mesh's objects folder (live).
    Apply(apply::Args),
    /// Create or delete one pod of the local mesh, as its node would (CNI ADD/DEL).
    Pod(pod::Args),
    /// The local mesh's sample app (run by `up` inside pods).
    #[command(hide = true)]
    Sample(sample::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Install(args) => install::run(&args),
        Command::Crds(args) => crds::run(&args),
        Command::Up(args) => up::run(&args),
        Command::Down(args) => down::run(&args),
        Command::Sample(args) => sample::run(&args),
        Command::Apply(args) => apply::run(&args),
        Command::Pod(args) => pod::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Upgrade(args) => upgrade::run(&args),
        Command::ProxyConfig(args) => proxy_config::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Dashboard(args) => dashboard::run(&args),
        Command::Check(args) => check::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line: "reading --ca-cert: cannot read …".
            eprintln!("ambitctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}
