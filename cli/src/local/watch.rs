//! What `ambitctl up` shows while the mesh runs: it follows the ztunnels' JSON logs, the
//! controller's log and the sample clients' results, and turns each interesting line into one
//! readable line: connections (through HBONE with which identities, plaintext, or refused and
//! why), clients' results when they change, and components' warnings and errors.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;

use serde_json::Value;

use super::state::ClusterState;

/// Whose lines a followed file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Controller,
    Ztunnel(String),
    Client(String),
    /// A waypoint, by its Gateway's `namespace/name`.
    Waypoint(String),
}

/// Follows files from where they were when added, yielding complete new lines.
#[derive(Debug, Default)]
pub struct Tail {
    files: Vec<(Source, PathBuf, u64, String)>,
}

impl Tail {
    /// Follows the logs of every component of `state`, from their start.
    pub fn of_cluster(state: &ClusterState) -> Self {
        let mut tail = Tail::default();
        if let Some(c) = &state.controller {
            tail.files
                .push((Source::Controller, c.log.clone(), 0, String::new()));
        }
        for n in &state.nodes {
            if let Some(z) = &n.ztunnel {
                tail.files.push((
                    Source::Ztunnel(n.name.clone()),
                    z.log.clone(),
                    0,
                    String::new(),
                ));
            }
        }
        for p in &state.pods {
            let source = match &p.sample {
                Some(super::objects::Sample::Client { .. }) => {
                    Source::Client(format!("{}/{}", p.namespace, p.name))
                }
                Some(super::objects::Sample::Waypoint { gateway }) => {
                    Source::Waypoint(gateway.clone())
                }
                _ => continue,
            };
            if let Some(pr) = &p.process {
                tail.files.push((source, pr.log.clone(), 0, String::new()));
            }
        }
        tail
    }

    /// New complete lines since the last call.
    pub fn poll(&mut self) -> Vec<(Source, String)> {
        let mut out = Vec::new();
        for (source, path, offset, partial) in &mut self.files {
            let Ok(mut f) = File::open(&*path) else {
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < *offset {
                // Truncated: start over.
                *offset = 0;
                partial.clear();
            }
            if f.seek(SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_err() {
                continue;
            }
            *offset += buf.len() as u64;
            partial.push_str(&String::from_utf8_lossy(&buf));
            while let Some(i) = partial.find('\n') {
                let line: String = partial.drain(..=i).collect();
                out.push((source.clone(), line.trim_end().to_owned()));
            }
        }
        out
    }
}

/// Turns lines into what the user reads; remembers each client's last result so only
/// changes are shown.
#[derive(Debug, Default)]
pub struct Pretty {
    last_client: BTreeMap<String, String>,
    /// When each kind of connection line was last shown: the sample calls every second, so
    /// an unchanged line is shown again only after [`REPEAT_AFTER`].
    shown: BTreeMap<String, std::time::Instant>,
}

/// How long an identical connection line stays quiet.
const REPEAT_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

/// `spiffe://cluster.local/ns/demo/sa/client` -> `demo/sa/client` (the trust domain is the same
/// everywhere in a local cluster).
fn short_id(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once("/ns/"))
        .map_or(id, |(_, tail)| tail)
}

impl Pretty {
    /// The line to print for `line` from `source`, if it is worth showing.
    pub fn format(&mut self, source: &Source, line: &str) -> Option<String> {
        let v: Value = serde_json::from_str(line).ok()?;
        match source {
            Source::Client(who) => {
                let ok = v.get("ok").and_then(Value::as_bool) == Some(true);
                let result = if ok {
                    // The greeting names the server pod and the client address it saw.
                    format!("ok       {}", s(&v, "reply"))
                } else {
                    format!("FAILING  {}", s(&v, "error"))
                };
                // Only a change between working and (a different) failure is news.
                let key = if ok { "ok".to_owned() } else { result.clone() };
                let changed = self.last_client.get(who) != Some(&key);
                self.last_client.insert(who.clone(), key);
                changed.then(|| format!("client  {who} -> {}: {result}", s(&v, "target")))
            }
            Source::Ztunnel(node) if s(&v, "target") == "access" => {
                let (key, line) = access_line(node, &v);
                self.unless_repeated(key, line)
            }
            Source::Ztunnel(node) => component_line(&format!("ztunnel {node}"), &v),
            Source::Waypoint(gw) if s(&v, "target") == "access" => {
                let (key, line) = request_line(gw, &v);
                self.unless_repeated(key, line)
            }
            Source::Waypoint(gw) => component_line(&format!("waypoint {gw}"), &v),
            Source::Controller => component_line("controller", &v),
        }
    }
}

impl Pretty {
    /// `line`, unless one with the same key was shown within [`REPEAT_AFTER`].
    fn unless_repeated(&mut self, key: String, line: String) -> Option<String> {
        let now = std::time::Instant::now();
        let fresh = self
            .shown
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) > REPEAT_AFTER);
        fresh.then(|| {
            self.shown.insert(key, now);
            line
        })
    }
}

/// The line, and its key without byte counts (what makes two lines "the same").
fn access_line(node: &str, v: &Value) -> (String, String) {
    // A plaintext client's workload is only what its address says: shown, and marked so.
    let src = match (s(v, "src.workload"), s(v, "src.workload_by_ip")) {
        ("-", "-") => s(v, "src.addr").to_owned(),
        ("-", by_ip) => format!("{by_ip} (by IP, unverified)"),
        (w, _) => w.to_owned(),
    };
    let dst = match (s(v, "dst.service"), s(v, "dst.workload")) {
        ("-", "-") => s(v, "dst.addr").to_owned(),
        ("-", w) => w.to_owned(),
        (svc, "-") => svc.split('.').take(2).collect::<Vec<_>>().join("."),
        (svc, w) => format!(
            "{} ({w})",
            svc.split('.').take(2).collect::<Vec<_>>().join(".")
        ),
    };
    let how = match s(v, "protocol") {
        "hbone" => format!(
            "HBONE mTLS {} -> {}",
            short_id(s(v, "src.identity")),
            short_id(s(v, "dst.identity"))
        ),
        "tcp" => "plain TCP (no mesh identity)".to_owned(),
        p => p.to_owned(),
    };
    let (outcome, bytes) = match s(v, "outcome") {
        "ok" => (
            "ok".to_owned(),
            format!(" {}B/{}B", v["bytes_sent"], v["bytes_received"]),
        ),
        "refused" => (format!("DENIED: {}", s(v, "reason")), String::new()),
        "revoked" => (
            format!("CLOSED BY POLICY: {}", s(v, "reason")),
            String::new(),
        ),
        other => (
            format!("{}: {}", other.to_uppercase(), s(v, "reason")),
            String::new(),
        ),
    };
    let key = format!(
        "{:<8} {node:<7} {:<8} {src} -> {dst}  [{how}]  {outcome}",
        "conn",
        s(v, "direction")
    );
    (key.clone(), key + &bytes)
}

/// A waypoint's request (its access log: one JSON line per request, fields nested), and its
/// key: the same as the line, since requests carry no byte counts worth telling apart.
fn request_line(gateway: &str, v: &Value) -> (String, String) {
    let f = v.get("fields").unwrap_or(v);
    let src = match s(f, "src_workload") {
        "-" | "unknown" => short_id(s(f, "src_principal")).to_owned(),
        w => w.to_owned(),
    };
    let dst = s(f, "dst_service")
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".");
    let status = s(f, "status");
    let outcome = match (status, s(f, "reason")) {
        ("403", reason) => format!("DENIED: 403 {reason}"),
        (code, "-" | "") => code.to_owned(),
        (code, reason) => format!("{code} {reason}"),
    };
    let line = format!(
        "{:<8} {gateway} {src} -> {dst}  {} {}  [HTTP as {}]  {outcome}",
        "request",
        s(f, "method"),
        s(f, "path"),
        short_id(s(f, "src_principal")),
    );
    (line.clone(), line)
}

fn component_line(who: &str, v: &Value) -> Option<String> {
    let level = s(v, "level");
    if level != "WARN" && level != "ERROR" {
        return None;
    }
    let fields = v.get("fields").unwrap_or(v);
    let msg = s(fields, "message");
    let extra: Vec<String> = fields
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "message")
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.as_str().map_or_else(|| v.to_string(), str::to_owned)
            )
        })
        .collect();
    Some(format!("{level:<8} {who}: {msg} {}", extra.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hbone_connection_reads_as_one_line() {
        let line = r#"{"target":"access","level":"INFO","src.addr":"10.77.2.2:4000","src.workload":"demo/client-1","src.identity":"spiffe://cluster.local/ns/demo/sa/client","dst.addr":"10.77.1.2:8080","dst.workload":"demo/echo-1","dst.identity":"spiffe://cluster.local/ns/demo/sa/echo","dst.service":"echo.demo.svc.cluster.local","direction":"outbound","protocol":"hbone","bytes_sent":8,"bytes_received":60,"outcome":"ok"}"#;
        let out = Pretty::default()
            .format(&Source::Ztunnel("node2".into()), line)
            .unwrap();
        assert!(
            out.contains("demo/client-1 -> echo.demo (demo/echo-1)"),
            "{out}"
        );
        assert!(
            out.contains("HBONE mTLS demo/sa/client -> demo/sa/echo"),
            "{out}"
        );
    }

    #[test]
    fn a_plaintext_client_is_named_by_address_and_marked_unverified() {
        let line = r#"{"target":"access","level":"INFO","src.addr":"10.77.2.3:4000","src.workload":"-","src.workload_by_ip":"legacy/legacy-client-1","src.identity":"unknown","dst.addr":"10.77.1.2:8080","dst.workload":"demo/echo-1","dst.identity":"spiffe://cluster.local/ns/demo/sa/echo","dst.service":"-","direction":"inbound","protocol":"tcp","bytes_sent":8,"bytes_received":60,"outcome":"ok"}"#;
        let out = Pretty::default()
            .format(&Source::Ztunnel("node1".into()), line)
            .unwrap();
        assert!(
            out.contains("legacy/legacy-client-1 (by IP, unverified) -> demo/echo-1"),
            "{out}"
        );
        assert!(out.contains("plain TCP (no mesh identity)"), "{out}");
        assert!(!out.contains("sa/default"), "{out}");
    }

    #[test]
    fn a_connection_closed_by_a_policy_change_says_which_policy() {
        let line = r#"{"target":"access","level":"INFO","src.addr":"10.77.2.2:4000","src.workload":"demo/client-1","src.identity":"spiffe://cluster.local/ns/demo/sa/client","dst.addr":"10.77.1.2:8080","dst.workload":"demo/echo-1","dst.identity":"spiffe://cluster.local/ns/demo/sa/echo","dst.service":"-","direction":"inbound","protocol":"hbone","bytes_sent":8,"bytes_received":60,"outcome":"revoked","reason":"policy changed: 403: denied by demo/deny-client (rule 0)"}"#;
        let out = Pretty::default()
            .format(&Source::Ztunnel("node1".into()), line)
            .unwrap();
        assert!(
            out.ends_with(
                "CLOSED BY POLICY: policy changed: 403: denied by demo/deny-client (rule 0)"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_waypoint_request_reads_as_one_line() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"request","src_principal":"spiffe://cluster.local/ns/shop/sa/client","src_workload":"client-0","dst_service":"api.shop.svc.cluster.local","method":"DELETE","path":"/orders/1","status":"403","reason":"denied by shop/no-delete"},"target":"access"}"#;
        let mut p = Pretty::default();
        let gw = Source::Waypoint("shop/waypoint".into());
        let out = p.format(&gw, line).unwrap();
        assert!(
            out.contains("shop/waypoint client-0 -> api.shop  DELETE /orders/1"),
            "{out}"
        );
        assert!(out.contains("[HTTP as shop/sa/client]"), "{out}");
        assert!(
            out.ends_with("DENIED: 403 denied by shop/no-delete"),
            "{out}"
        );
        // The same request again is not news for a while.
        assert!(p.format(&gw, line).is_none());
    }

    #[test]
    fn clients_are_shown_when_their_result_changes() {
        let mut p = Pretty::default();
        let who = Source::Client("demo/client-1".into());
        let ok = r#"{"ok":true,"target":"10.96.0.10:80","reply":"hello from demo/echo-1 (10.77.1.2:8080); you are 10.77.2.2:1"}"#;
        assert!(p.format(&who, ok).is_some());
        assert!(p.format(&who, &ok.replace("echo-1", "echo-2")).is_none());
        let failed = r#"{"ok":false,"target":"10.96.0.10:80","error":"connection reset"}"#;
        assert!(p.format(&who, failed).unwrap().contains("FAILING"));
    }
}
