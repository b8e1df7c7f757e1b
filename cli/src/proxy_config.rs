//! `ambitctl proxy-config <node>`: what one node's ztunnel holds (workloads, services,
//! policies, certificates with expiry), read from its admin API on 127.0.0.1:15000: inside the
//! node's namespace in the local mesh, through a port-forward to the node's ztunnel pod with
//! `--kubernetes`. Tables by default, `-o json` for the raw `/config_dump` and `/certs`.

use std::path::PathBuf;

use ambitctl::local::inspect::{self, cell, table};
use ambitctl::local::state::{ClusterState, DEFAULT_STATE_DIR};
use anyhow::{bail, Context};
use serde_json::Value;

use crate::cluster::{self, ClusterArgs};
use crate::status::Output;

/// Options of `ambitctl proxy-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node whose ztunnel to read (e.g. node1).
    node: String,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table")]
    output: Output,
}

fn rows<'a>(v: &'a Value, f: impl Fn(&'a Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(_, x)| f(x))
        .collect()
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.cluster.kubernetes {
        let ns = &args.cluster.namespace;
        let v = cluster::runtime()?.block_on(async {
            let client = cluster::client(args.cluster.kubeconfig.as_deref()).await?;
            let pod = cluster::ztunnel_on(&client, ns, &args.node).await?;
            anyhow::Ok(cluster::ztunnel(&client, ns, &pod).await)
        })?;
        let place = cell(&v["pod"]);
        return print(args, &place, &v);
    }
    let state = ClusterState::load(&args.state_dir).context("ambitctl proxy-config")?;
    let Some(node) = state.node(&args.node) else {
        let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
        bail!(
            "no node {:?} in the local mesh (nodes: {})",
            args.node,
            names.join(", ")
        );
    };
    let v = inspect::node(node);
    print(args, &node.netns, &v)
}

/// The tables (or JSON) of one ztunnel's `v` (the shape of `inspect::node`); `place` says
/// where it runs (its namespace, or its pod).
fn print(args: &Args, place: &str, v: &Value) -> anyhow::Result<()> {
    if matches!(args.output, Output::Json) {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    for what in ["config_dump", "certs"] {
        if let Some(e) = v[what].get("error") {
            bail!("{}: cannot read {what}: {}", args.node, cell(e));
        }
    }
    let st = &v["config_dump"]["state"];
    let local = &v["config_dump"]["local_pods"];
    println!(
        "ztunnel on {} ({}), state version {}\n",
        args.node,
        place,
        cell(&st["version"])
    );
    println!("WORKLOADS");
    table(
        &[
            "NAMESPACE",
            "NAME",
            "ADDRESS",
            "NODE",
            "IDENTITY",
            "PROTOCOL",
            "LOCAL",
        ],
        &rows(&st["workloads"], |w| {
            let uid = cell(&w["uid"]);
            vec![
                cell(&w["namespace"]),
                cell(&w["name"]),
                cell(&w["addresses"]),
                cell(&w["node"]),
                cell(&w["identity"]),
                cell(&w["protocol"]),
                local.get(&uid).map_or("-".into(), |p| cell(&p["state"])),
            ]
        }),
    );
    println!("\nSERVICES");
    table(
        &[
            "NAMESPACE",
            "NAME",
            "VIPS",
            "PORTS",
            "ENDPOINTS",
            "WAYPOINT",
        ],
        &rows(&st["services"], |s| {
            let ports: Vec<String> = s["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}->{}", cell(&p["port"]), cell(&p["target_port"])))
                .collect();
            vec![
                cell(&s["namespace"]),
                cell(&s["name"]),
                cell(&s["vips"]),
                ports.join(","),
                s["endpoints"].as_array().map_or(0, Vec::len).to_string(),
                cell(&s["waypoint"]),
            ]
        }),
    );
    println!("\nPOLICIES");
    table(
        &["NAME", "ACTION", "RULES"],
        &st["policies"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, p)| {
                vec![
                    name.clone(),
                    cell(&p["action"]),
                    p["rules"].as_array().map_or(0, Vec::len).to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    println!("\nCERTIFICATES");
    table(
        &[
            "IDENTITY",
            "STATE",
            "NOT AFTER",
            "EXPIRES IN",
            "ROTATES AT",
            "SERIAL",
        ],
        &v["certs"]["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let secs = c["expires_in_seconds"].as_u64().unwrap_or(0);
                vec![
                    cell(&c["identity"]),
                    cell(&c["state"]),
                    cell(&c["not_after"]),
                    format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
                    cell(&c["refresh_at"]),
                    cell(&c["serial"]),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(())
}
