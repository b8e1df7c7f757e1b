//! The walk against a fixture mesh (two nodes' ztunnel dumps, no waypoint): the branches the
//! local-mesh test does not take — a source outside the mesh, a source whose capture
//! failed, a destination outside the mesh, a port the service does not expose, an ALLOW
//! policy that names no rule the source meets, names that resolve and names that do not.

use serde_json::json;

use super::*;

fn workload(ns: &str, name: &str, sa: &str, node: &str, ip: &str, mesh: bool) -> Value {
    json!({
        "uid": format!("{ns}/{name}"), "name": name, "namespace": ns, "service_account": sa,
        "identity": format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"), "node": node,
        "addresses": [ip], "protocol": if mesh { "HBONE" } else { "TCP" }, "waypoint": null,
        "authorization_policies": [], "labels": {}, "workload_name": name,
        "canonical_name": name, "canonical_revision": "latest", "zone": null,
        "is_waypoint": false,
    })
}

/// demo/client (node2, enrolled), demo/broken (node2, capture failed), legacy/old (not in
/// the mesh), demo/echo-0 behind service echo (node1, port 80 -> 8080), and an ALLOW policy
/// on demo that lets only sa/friend in.
fn state() -> Value {
    let mut workloads = serde_json::Map::new();
    for w in [
        workload("demo", "client", "client", "node2", "10.77.2.2", true),
        workload("demo", "broken", "client", "node2", "10.77.2.3", true),
        workload("legacy", "old", "default", "node2", "10.77.2.4", false),
        workload("demo", "echo-0", "echo", "node1", "10.77.1.2", true),
    ] {
        workloads.insert(w["uid"].as_str().unwrap_or_default().to_string(), w);
    }
    json!({
        "version": 3,
        "workloads": workloads,
        "services": {"demo/echo.demo.svc.cluster.local": {
            "name": "echo", "namespace": "demo", "hostname": "echo.demo.svc.cluster.local",
            "vips": ["10.96.0.10"],
            "ports": [{"port": 80, "target_port": 8080, "name": "http", "app_protocol": ""}],
            "endpoints": [{"workload_uid": "demo/echo-0", "ports": {}, "ready": true}],
            "waypoint": null, "load_balancing": "RANDOM",
        }},
        "policies": {"demo/only-friends": {
            "name": "only-friends", "namespace": "demo", "scope": "NAMESPACE", "action": "ALLOW",
            "rules": [{"from": [{"principals": ["cluster.local/ns/demo/sa/friend"]}]}],
        }},
        "trust_roots": [],
    })
}

struct Fixture;

impl MeshSource for Fixture {
    fn nodes(&self) -> Vec<String> {
        vec!["node1".into(), "node2".into()]
    }

    fn ztunnel_dump(&self, node: &str) -> anyhow::Result<Value> {
        let pods = match node {
            "node1" => {
                json!({"demo/echo-0": {"state": "enrolled", "ip": "10.77.1.2", "identity": "x"}})
            }
            _ => json!({
                "demo/client": {"state": "enrolled", "ip": "10.77.2.2", "identity": "x"},
                "demo/broken": {"state": "failed", "reason": "no netns for 10.77.2.3", "attempts": 4},
            }),
        };
        Ok(json!({"state": state(), "local_pods": pods}))
    }

    fn waypoint_dump(&self, ip: IpAddr) -> anyhow::Result<super::super::source::WaypointDump> {
        bail!("no waypoint at {ip}")
    }

    fn access_log(&self, _proxy: &Proxy) -> anyhow::Result<Vec<Value>> {
        Ok(vec![
            json!({"src.addr": "10.77.2.2:40000", "dst.addr": "10.77.1.2:8080", "outcome": "refused"}),
            json!({"src.addr": "10.77.2.9:40000", "dst.addr": "10.77.1.2:8080", "outcome": "ok"}),
            json!({"src.addr": "10.77.2.2:40001", "dst.addr": "10.77.9.9:80", "outcome": "ok"}),
        ])
    }
}

fn query(source: &str, destination: &str) -> Query {
    Query {
        source: source.into(),
        destination: destination.into(),
        port: None,
        method: None,
        path: "/".into(),
        headers: Vec::new(),
    }
}

fn run(source: &str, destination: &str) -> Explanation {
    explain(&Fixture, &query(source, destination)).expect("explained")
}

fn steps(e: &Explanation) -> Vec<String> {
    e.steps
        .iter()
        .map(|s| format!("{} {:?}", s.step, s.outcome))
        .collect()
}

#[test]
fn an_allow_policy_the_source_does_not_meet_names_the_field() {
    let e = run("demo/client", "echo.demo");
    assert_eq!(
        steps(&e),
        ["capture Pass", "outbound Pass", "inbound Denied"],
        "{e:#?}"
    );
    assert_eq!(e.destination.to_string(), "10.96.0.10:80");
    assert_eq!(e.outcome, Outcome::Denied);
    assert_eq!(e.decided_at, "inbound (ztunnel on node1)");
    let p = e.steps[2].policy.as_ref().expect("policy ran");
    assert!(!p.allowed && p.decided_by.is_none());
    let named: Vec<String> = p
        .fields
        .iter()
        .map(|f| {
            format!(
                "{} {} {} {}",
                f.policy, f.check.field, f.check.seen, f.check.matched
            )
        })
        .collect();
    assert_eq!(
        named,
        ["demo/only-friends from[0].source.principals cluster.local/ns/demo/sa/client false"]
    );
    // The events from this source to an address on the way, not the others.
    let events: Vec<&Value> = e.access_log.iter().flat_map(|l| &l.events).collect();
    assert!(
        events.iter().all(|ev| ev["src.addr"] == "10.77.2.2:40000"),
        "{events:?}"
    );
    assert_eq!(events.len(), 2, "one per ztunnel on the way: {events:?}");
}

#[test]
fn refusals_before_policy_and_sources_outside_the_mesh() {
    // A port the service does not expose: refused by the source's ztunnel.
    let e = run("client", "demo/echo:81");
    assert_eq!(steps(&e), ["capture Pass", "outbound Refused"]);
    assert!(e.reason.contains("does not expose port 81"), "{}", e.reason);
    // A destination outside the mesh: passthrough.
    let e = run("demo/client", "192.0.2.1:443");
    assert_eq!(steps(&e), ["capture Pass", "outbound Passthrough"]);
    assert_eq!(e.destination_kind, "an address the mesh does not know");
    // A pod whose capture failed: what happens cannot be told.
    let e = run("demo/broken", "echo.demo");
    assert_eq!(steps(&e), ["capture Unknown"]);
    assert!(e.reason.contains("no netns for 10.77.2.3"), "{}", e.reason);
    // A source outside the mesh reaches the pod's plaintext capture, where policy runs
    // without an identity.
    let e = run("legacy/old", "demo/echo-0:8080");
    assert_eq!(steps(&e), ["capture Pass", "inbound Denied"]);
    let p = e.steps[1].policy.as_ref().expect("policy ran");
    assert_eq!(p.fields[0].check.seen, "none (plaintext)");
}

#[test]
fn names_resolve_as_operators_write_them() {
    for dest in [
        "echo.demo",
        "echo.demo:80",
        "echo.demo.svc.cluster.local",
        "demo/echo",
        "10.96.0.10:80",
    ] {
        assert_eq!(
            run("demo/client", dest).destination.to_string(),
            "10.96.0.10:80",
            "{dest}"
        );
    }
    let e = run("demo/client", "demo/echo-0:8080");
    assert_eq!(e.destination_kind, "pod demo/echo-0");
    // A service and a pod of one name: the service.
    assert_eq!(
        run("demo/client", "demo/echo").destination_kind,
        "service demo/echo"
    );
    // A service account stands for one of its pods.
    let e = run("demo/echo-0", "demo/echo-0:8080");
    assert!(!e.source.by_service_account);
    let e = run("legacy/default", "demo/echo-0:8080");
    assert!(e.source.by_service_account);
    assert_eq!(e.source.pod, "legacy/old");
    for (source, dest, error) in [
        ("nobody", "echo.demo", "is no pod"),
        (
            "demo/client",
            "nothing.nowhere",
            "is no service, pod or address",
        ),
        ("demo/client", "10.77.1.2", "give a port"),
        ("demo/client", "echo.demo:http", "bad port"),
    ] {
        let err = explain(&Fixture, &query(source, dest)).expect_err("refused");
        assert!(
            format!("{err:#}").contains(error),
            "{source} {dest}: {err:#}"
        );
    }
}
