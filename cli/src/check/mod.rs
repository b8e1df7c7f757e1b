//! `ambitctl check`: is this node ready for Ambit (`--pre`), and is an installed mesh healthy
//! (the local mesh by default, `--kubernetes` for a cluster through its API server)? Each check
//! is one line with its result; each failure says what is wrong and what to do about it. The
//! command exits non-zero when any check failed, so scripts and CI can gate on it.
//!
//! - [`pre`]: this node's kernel and tools, probed for real in a scratch network namespace
//!   with ztunnel's own capture code, and the directories the CNI plugin and ztunnel use.
//! - [`local`]: a local mesh made by `ambitctl up`, through its components' ops ports.
//! - [`kube`]: a cluster, through the API server (CRDs served, controller, every node's
//!   ztunnel, waypoints, the trust root).
//! - [`certs`]: the one rule about certificate lifetimes both post-install checks use.
//! - [`report`]: what a check found, as every target reports it.

mod certs;
mod kube;
mod local;
mod pre;
mod report;

use std::path::PathBuf;

use crate::cluster::ClusterArgs;
use crate::status::Output;
use ambitctl::local::inspect::render_table;
use ambitctl::local::state::DEFAULT_STATE_DIR;
use report::{Check, Outcome, Report};

/// Options of `ambitctl check`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    ambitctl check --pre                  # can this node run ztunnel? (root)\n  \
    ambitctl check                        # the local mesh made by `ambitctl up`\n  \
    ambitctl check --kubernetes           # the cluster of the current kubeconfig context")]
pub struct Args {
    /// Check this node before installing: kernel features of the capture rules, iptables and
    /// ip6tables, the netns and CNI directories (needs root: it probes in a scratch namespace).
    #[arg(long, conflicts_with = "kubernetes")]
    pre: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The local mesh's state directory.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// With --pre: where the container runtime keeps pod network namespaces (ztunnel's
    /// AMBIT_NETNS_DIR).
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// With --pre: the node's CNI configuration directory (ambit-cni chains onto a .conflist
    /// there).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// With --pre: the node's CNI plugin directory (ambit-cni is copied there).
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    output: Output,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let report = if args.pre {
        pre::run(&pre::Dirs {
            netns: args.netns_dir.clone(),
            cni_conf: args.cni_conf_dir.clone(),
            cni_bin: args.cni_bin_dir.clone(),
        })?
    } else if args.cluster.kubernetes {
        kube::run(args.cluster.kubeconfig.as_deref(), &args.cluster.namespace)?
    } else {
        local::run(&args.state_dir)?
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", text(&report)),
    }
    match report.failed() {
        0 => Ok(()),
        n => anyhow::bail!("{n} of {} checks failed", report.checks.len()),
    }
}

fn word(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Warn => "WARN",
        Outcome::Fail => "FAIL",
    }
}

/// The report as a table, then what to do about each failure and warning.
fn text(report: &Report) -> String {
    use std::fmt::Write as _;
    let rows: Vec<Vec<String>> = report
        .checks
        .iter()
        .map(|c| vec![word(c.outcome).to_owned(), c.name.clone(), c.detail.clone()])
        .collect();
    let mut o = format!("{}\n\n", report.target);
    o.push_str(&render_table(&["RESULT", "CHECK", "DETAIL"], &rows));
    let todo: Vec<&Check> = report.checks.iter().filter(|c| c.fix.is_some()).collect();
    if !todo.is_empty() {
        o.push('\n');
    }
    for c in todo {
        let _ = writeln!(
            o,
            "{} {}: {}\n  fix: {}",
            word(c.outcome),
            c.name,
            c.detail,
            c.fix.as_deref().unwrap_or_default()
        );
    }
    let failed = report.failed();
    let _ = writeln!(o, "\n{} checks, {} failed", report.checks.len(), failed);
    o
}
