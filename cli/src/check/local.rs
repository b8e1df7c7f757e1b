//! `ambitctl check` on a local mesh made by `ambitctl up`: the objects folder parses, the
//! controller runs and is ready, each node's ztunnel runs, is ready and holds its discovery
//! stream, each waypoint runs and is ready, and every workload certificate has more than a
//! quarter of its lifetime left. Read through the same ops ports as `ambitctl status`
//! (readiness 15021, metrics 15020, admin 15000 inside the namespaces; the controller's 15014).

use std::net::SocketAddr;
use std::path::Path;

use ambitctl::local::admin;
use ambitctl::local::cluster::{
    CONTROLLER_OPS_PORT, ZTUNNEL_ADMIN_PORT, ZTUNNEL_METRICS_PORT, ZTUNNEL_READINESS_PORT,
};
use ambitctl::local::net::FABRIC_IP;
use ambitctl::local::objects::{error_chain, Sample};
use ambitctl::local::procs;
use ambitctl::local::state::{ClusterState, NodeState, PodState};
use anyhow::Context;
use serde_json::Value;

use super::certs;
use super::report::{Check, Report};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A readiness answer: `Ok(())` on 200, else what the component says it waits for.
fn ready(netns: &str, addr: SocketAddr) -> Result<(), String> {
    match admin::get(netns, addr, "/healthz/ready") {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("readiness: HTTP {status}: {}", body.trim())),
        Err(e) => Err(format!("readiness: {}", error_chain(&e))),
    }
}

pub fn run(state_dir: &Path) -> anyhow::Result<Report> {
    let state = ClusterState::load(state_dir).context("ambitctl check")?;
    let sd = state.state_dir.display().to_string();
    let mut checks = vec![objects(&state), controller(&state, &sd)];
    for node in &state.nodes {
        checks.push(ztunnel(node, &sd));
        if let Some(c) = discovery(node, &state.controller_url) {
            checks.push(c);
        }
        checks.extend(certificates(node));
    }
    for pod in &state.pods {
        if let Some(Sample::Waypoint { gateway }) = &pod.sample {
            checks.push(waypoint(pod, gateway, &sd));
        }
    }
    Ok(Report {
        target: format!("local mesh in {sd}: post-install checks"),
        checks,
    })
}

/// The folder the controller reads, as its own parser reads it.
fn objects(state: &ClusterState) -> Check {
    let name = "objects folder";
    let scan = ambit_controller::source::local::Scanner::new(&state.objects_dir).scan();
    if scan.errors.is_empty() {
        return Check::ok(
            name,
            format!(
                "{}: {} change(s) read, no errors",
                state.objects_dir.display(),
                scan.events.len()
            ),
        );
    }
    let errors: Vec<String> = scan.errors.iter().map(|e| error_chain(e)).collect();
    Check::fail(
        name,
        format!(
            "{}: {} error(s): {}",
            state.objects_dir.display(),
            errors.len(),
            errors.join("; ")
        ),
        "correct the files named (the controller ignores what it cannot read); `ambitctl apply FILE` checks a file before adding it",
    )
}

fn controller(state: &ClusterState, sd: &str) -> Check {
    let name = "controller";
    let restart = format!(
        "read {sd}/logs/controller.log, then rebuild the mesh: `ambitctl down --state-dir {sd}` and `ambitctl up` with the same options"
    );
    let Some(proc) = &state.controller else {
        return Check::fail(
            name,
            "no controller recorded: `ambitctl up` did not get that far",
            restart,
        );
    };
    if !procs::alive(proc.pid) {
        return Check::fail(
            name,
            format!("not running (pid {} is gone)", proc.pid),
            restart,
        );
    }
    match ready(
        &state.fabric,
        SocketAddr::from((FABRIC_IP, CONTROLLER_OPS_PORT)),
    ) {
        Ok(()) => Check::ok(
            name,
            format!("pid {}, ready, serving {}", proc.pid, state.controller_url),
        ),
        Err(why) => Check::fail(
            name,
            format!("pid {} runs but is not ready: {why}", proc.pid),
            format!("read {sd}/logs/controller.log: it logs what it waits for"),
        ),
    }
}

fn ztunnel(node: &NodeState, sd: &str) -> Check {
    let name = format!("ztunnel on {}", node.name);
    let start = format!(
        "start a new one: `ambitctl upgrade {} --state-dir {sd}`",
        node.name
    );
    let Some(proc) = &node.ztunnel else {
        return Check::fail(name, "never started", start);
    };
    if !procs::alive(proc.pid) {
        return Check::fail(
            name,
            format!(
                "not running (pid {} is gone): pods on {} are refused, not let through",
                proc.pid, node.name
            ),
            format!("{start}; why it stopped: {}", proc.log.display()),
        );
    }
    match ready(&node.netns, loopback(ZTUNNEL_READINESS_PORT)) {
        Ok(()) => Check::ok(name, format!("pid {}, ready", proc.pid)),
        Err(why) => Check::fail(
            name,
            format!("pid {} runs but is not ready: {why}", proc.pid),
            format!("read {}: it logs what it waits for", proc.log.display()),
        ),
    }
}

/// Whether a running ztunnel holds its discovery stream (`ambit_xds_connection_state`).
fn discovery(node: &NodeState, controller: &str) -> Option<Check> {
    let alive = node.ztunnel.as_ref().is_some_and(|z| procs::alive(z.pid));
    if !alive {
        return None;
    }
    let name = format!("ztunnel on {} -> controller", node.name);
    let body = match admin::get(&node.netns, loopback(ZTUNNEL_METRICS_PORT), "/metrics") {
        Ok((200, body)) => body,
        Ok((status, _)) => {
            return Some(Check::fail(
                name,
                format!("/metrics: HTTP {status}"),
                "read the ztunnel's log",
            ))
        }
        Err(e) => {
            return Some(Check::fail(
                name,
                format!("/metrics: {}", error_chain(&e)),
                "read the ztunnel's log",
            ))
        }
    };
    let connected = body
        .lines()
        .find_map(|l| l.strip_prefix("ambit_xds_connection_state "))
        .map(str::trim);
    Some(match connected {
        Some("1") => Check::ok(name, format!("discovery stream to {controller} up")),
        other => Check::fail(
            name,
            format!(
                "discovery stream to {controller} down (ambit_xds_connection_state {}): it serves its last state meanwhile",
                other.unwrap_or("absent")
            ),
            "check the controller (above) and the ztunnel's log for why it cannot connect",
        ),
    })
}

/// One check per workload certificate the node's ztunnel holds.
fn certificates(node: &NodeState) -> Vec<Check> {
    let alive = node.ztunnel.as_ref().is_some_and(|z| procs::alive(z.pid));
    if !alive {
        return Vec::new();
    }
    let body = match admin::get(&node.netns, loopback(ZTUNNEL_ADMIN_PORT), "/certs") {
        Ok((200, body)) => body,
        Ok((status, _)) => {
            return vec![Check::fail(
                format!("certificates on {}", node.name),
                format!("/certs: HTTP {status}"),
                "read the ztunnel's log",
            )]
        }
        Err(e) => {
            return vec![Check::fail(
                format!("certificates on {}", node.name),
                format!("/certs: {}", error_chain(&e)),
                "read the ztunnel's log",
            )]
        }
    };
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let list = json["certificates"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|c| certs::certificate(&node.name, c))
        .collect()
}

fn waypoint(pod: &PodState, gateway: &str, sd: &str) -> Check {
    let name = format!("waypoint {gateway}");
    let restart = format!(
        "read its log, then rebuild the mesh (`ambitctl down --state-dir {sd}`, `ambitctl up`)"
    );
    let Some(proc) = &pod.process else {
        return Check::fail(
            name,
            format!("pod {}/{} has no process", pod.namespace, pod.name),
            restart,
        );
    };
    if !procs::alive(proc.pid) {
        return Check::fail(
            name,
            format!(
                "not running (pid {} is gone): its services' traffic is refused",
                proc.pid
            ),
            format!("{restart}; log: {}", proc.log.display()),
        );
    }
    match ready(&pod.netns, loopback(ZTUNNEL_READINESS_PORT)) {
        Ok(()) => Check::ok(
            name,
            format!(
                "pod {}/{} ({}), ready: programmed by the controller",
                pod.namespace, pod.name, pod.ip
            ),
        ),
        Err(why) => Check::fail(
            name,
            format!("runs but is not ready: {why}"),
            format!("read {}: it logs what it waits for", proc.log.display()),
        ),
    }
}
