//! Reading a running local mesh for `ambitctl status` and `proxy-config`: the controller's
//! metrics (15014, in the fabric namespace), each ztunnel's readiness (15021) and admin API
//! (`/config_dump`, `/certs` on 127.0.0.1:15000 inside its node's namespace), as JSON values,
//! plus a plain table printer. What is unreachable is reported in the value, not as an error:
//! a status command must still say something useful when half the mesh is down.

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::admin;
use super::cluster::{CONTROLLER_OPS_PORT, ZTUNNEL_ADMIN_PORT, ZTUNNEL_READINESS_PORT};
use super::net;
use super::state::{ClusterState, NodeState};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// GET as JSON, or `{"error": ...}`.
fn get_json(netns: &str, addr: SocketAddr, path: &str) -> Value {
    match admin::get(netns, addr, path) {
        Ok((200, body)) => serde_json::from_str(&body)
            .unwrap_or_else(|e| json!({"error": format!("{path}: not JSON: {e}")})),
        Ok((status, body)) => json!({"error": format!("{path}: HTTP {status}: {}", body.trim())}),
        Err(e) => json!({"error": super::objects::error_chain(&e)}),
    }
}

/// The samples of a Prometheus text exposition, as (name with labels, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The controller's status: whether it runs, and its counters.
pub fn controller(state: &ClusterState) -> Value {
    let pid = state.controller.as_ref().map(|c| c.pid);
    let running = pid.is_some_and(super::procs::alive);
    let addr = SocketAddr::from((net::FABRIC_IP, CONTROLLER_OPS_PORT));
    let metrics = match admin::get(&state.fabric, addr, "/metrics") {
        Ok((200, body)) => controller_metrics(&body),
        Ok((status, _)) => json!({"error": format!("/metrics: HTTP {status}")}),
        Err(e) => json!({"error": super::objects::error_chain(&e)}),
    };
    let objects = count_objects(state);
    json!({
        "pid": pid, "running": running, "url": state.controller_url,
        "metrics": metrics, "objects": objects,
        "objects_dir": state.objects_dir,
    })
}

/// The controller's own series (`ambit_*`, histograms' buckets left out) out of its `/metrics`,
/// by name with labels; counters read as integers, not "2.0".
pub fn controller_metrics(body: &str) -> Value {
    let mut m = serde_json::Map::new();
    for (name, value) in samples(body) {
        if !name.contains("_bucket") && name.starts_with("ambit_") {
            let v = if value.fract() == 0.0 && value.abs() < 9.0e15 {
                json!(value as i64)
            } else {
                json!(value)
            };
            m.insert(name, v);
        }
    }
    Value::Object(m)
}

/// Objects in the folder by kind, as the controller's parser reads them.
fn count_objects(state: &ClusterState) -> Value {
    let scan = ambit_controller::source::local::Scanner::new(&state.objects_dir).scan();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for event in &scan.events {
        let objects: &[ambit_controller::model::Object] = match event {
            ambit_controller::model::SourceEvent::Apply(o) => std::slice::from_ref(&**o),
            ambit_controller::model::SourceEvent::Replace { objects, .. } => objects,
            _ => &[],
        };
        for o in objects {
            *counts.entry(o.kind().to_string()).or_default() += 1;
        }
    }
    json!({"by_kind": counts, "errors": scan.errors.iter().map(|e| super::objects::error_chain(e)).collect::<Vec<_>>()})
}

/// One node's ztunnel: ready?, what it holds, its certificates.
pub fn node(node: &NodeState) -> Value {
    let running = node
        .ztunnel
        .as_ref()
        .is_some_and(|z| super::procs::alive(z.pid));
    let ready = matches!(
        admin::get(&node.netns, local(ZTUNNEL_READINESS_PORT), "/healthz/ready"),
        Ok((200, _))
    );
    let dump = get_json(&node.netns, local(ZTUNNEL_ADMIN_PORT), "/config_dump");
    let certs = get_json(&node.netns, local(ZTUNNEL_ADMIN_PORT), "/certs");
    json!({
        "node": node.name, "netns": node.netns, "ip": node.ip,
        "running": running, "ready": ready,
        "config_dump": dump, "certs": certs,
    })
}

/// A waypoint pod: whether its process runs and its readiness answers (15021).
pub fn waypoint(pod: &super::state::PodState, gateway: &str) -> Value {
    let running = pod
        .process
        .as_ref()
        .is_some_and(|p| super::procs::alive(p.pid));
    let ready = matches!(
        admin::get(&pod.netns, local(ZTUNNEL_READINESS_PORT), "/healthz/ready"),
        Ok((200, _))
    );
    json!({
        "gateway": gateway, "pod": format!("{}/{}", pod.namespace, pod.name),
        "netns": pod.netns, "ip": pod.ip, "running": running, "ready": ready,
    })
}

/// Prints rows as aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(header, rows));
}

/// Rows as aligned columns under a header, one line each.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.len());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// A JSON value as a short cell.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}
