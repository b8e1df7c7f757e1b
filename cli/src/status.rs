//! `ambitctl status`: is the mesh healthy? The controller (running, connected proxies,
//! pushes, certificates signed, and in the local mesh the objects in its folder and any errors
//! in them) and each node's ztunnel (ready, workloads known, local pods enrolled,
//! certificates). The local mesh by default; `--kubernetes` reads a cluster through its API
//! server (the same ops ports, port-forwarded) and prints the same tables. Tables by default,
//! `-o json` for scripts.

use std::path::PathBuf;

use ambitctl::local::inspect::{self, cell, table};
use ambitctl::local::objects::Sample;
use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use anyhow::Context;
use serde_json::{json, Value};

use crate::cluster::{self, ClusterArgs};

/// Options of `ambitctl status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    output: Output,
}

/// How to print.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.cluster.kubernetes {
        return run_kubernetes(args);
    }
    let state = ClusterState::load(&args.state_dir).context("ambitctl status")?;
    let controller = inspect::controller(&state);
    let nodes: Vec<Value> = state.nodes.iter().map(inspect::node).collect();
    let waypoints: Vec<Value> = state
        .pods
        .iter()
        .filter_map(|p| match &p.sample {
            Some(Sample::Waypoint { gateway }) => Some(inspect::waypoint(p, gateway)),
            _ => None,
        })
        .collect();
    if matches!(args.output, Output::Json) {
        let all = json!({"controller": controller, "nodes": nodes, "waypoints": waypoints});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!(
        "controller  {}  {}  pid {}",
        state.controller_url,
        if controller["running"] == true {
            "running"
        } else {
            "NOT RUNNING"
        },
        cell(&controller["pid"])
    );
    print_counters(&controller);
    let by_kind = controller["objects"]["by_kind"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!("  objects in {}: {by_kind}", state.objects_dir.display());
    for e in controller["objects"]["errors"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!("  ERROR {}", cell(e));
    }
    println!();
    print_proxies(&nodes, &waypoints);
    Ok(())
}

/// The same report for a cluster: the controller's pod, each ztunnel pod and waypoint pod,
/// through port-forwards to their ops ports.
fn run_kubernetes(args: &Args) -> anyhow::Result<()> {
    let ns = &args.cluster.namespace;
    let (controller, nodes, waypoints) = cluster::runtime()?.block_on(async {
        let client = cluster::client(args.cluster.kubeconfig.as_deref()).await?;
        let (_, controller) = cluster::controller(&client, ns).await?;
        let nodes = cluster::ztunnels(&client, ns).await?;
        let waypoints = cluster::waypoints(&client).await;
        anyhow::Ok((controller, nodes, waypoints))
    })?;
    if matches!(args.output, Output::Json) {
        let all = json!({"controller": controller, "nodes": nodes, "waypoints": waypoints});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!(
        "controller  {}  {}  pod {}",
        cell(&controller["url"]),
        if controller["running"] == true {
            "running"
        } else {
            "NOT RUNNING"
        },
        cell(&controller["pod"])
    );
    print_counters(&controller);
    println!();
    print_proxies(&nodes, &waypoints);
    Ok(())
}

/// The controller's counters line.
fn print_counters(controller: &Value) {
    let m = &controller["metrics"];
    if let Some(err) = m.get("error") {
        println!("  metrics unavailable: {}", cell(err));
    } else {
        println!(
            "  connected ztunnels {}, pushes {}, nacks {}, certificates signed {}",
            cell(&m["ambit_connected_proxies{kind=\"ztunnel\"}"]),
            cell(&m["ambit_pushes_total"]),
            cell(&m["ambit_nacks_total"]),
            cell(&m["ambit_certificates_signed_total"]),
        );
    }
}

/// The ztunnel and waypoint tables, and what could not be read.
fn print_proxies(nodes: &[Value], waypoints: &[Value]) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let dump = &n["config_dump"];
            let certs = n["certs"]["certificates"].as_array();
            let soonest = certs
                .into_iter()
                .flatten()
                .filter_map(|c| c["expires_in_seconds"].as_u64())
                .min()
                .map_or("-".to_owned(), |s| {
                    format!("{}h{:02}m", s / 3600, s % 3600 / 60)
                });
            vec![
                cell(&n["node"]),
                cell(&n["ip"]),
                if n["ready"] == true {
                    "yes"
                } else if n["running"] == true {
                    "no"
                } else {
                    "not running"
                }
                .to_owned(),
                dump["state"]["workloads"]
                    .as_object()
                    .map_or("?".into(), |w| w.len().to_string()),
                dump["state"]["services"]
                    .as_object()
                    .map_or("?".into(), |w| w.len().to_string()),
                dump["state"]["policies"]
                    .as_object()
                    .map_or("?".into(), |w| w.len().to_string()),
                dump["local_pods"].as_object().map_or("?".into(), |p| {
                    let enrolled = p.values().filter(|v| v["state"] == "enrolled").count();
                    format!("{enrolled}/{}", p.len())
                }),
                certs.map_or("?".into(), |c| c.len().to_string()),
                soonest,
                cell(&dump["state"]["version"]),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "IP",
            "READY",
            "WORKLOADS",
            "SERVICES",
            "POLICIES",
            "ENROLLED",
            "CERTS",
            "EXPIRES IN",
            "VERSION",
        ],
        &rows,
    );
    if !waypoints.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = waypoints
            .iter()
            .map(|w| {
                let ready = if w["ready"] == true {
                    "yes"
                } else if w["running"] == true {
                    "no"
                } else {
                    "not running"
                };
                vec![
                    cell(&w["gateway"]),
                    cell(&w["pod"]),
                    cell(&w["ip"]),
                    ready.to_owned(),
                ]
            })
            .collect();
        table(&["WAYPOINT", "POD", "IP", "READY"], &rows);
    }
    for n in nodes {
        for what in ["config_dump", "certs"] {
            if let Some(e) = n[what].get("error") {
                println!("{}: {what}: {}", cell(&n["node"]), cell(e));
            }
        }
    }
}
