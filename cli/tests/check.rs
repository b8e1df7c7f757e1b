//! `ambitctl check --kubernetes` against the fake API server (the real wire format, through
//! kube-rs): a healthy install passes every check and exits 0; a missing CRD, a node whose
//! ztunnel is not ready and a trust root near its expiry are each named with what to do, and
//! the command exits non-zero. The cluster's objects (Deployments' and pods' statuses) are
//! written by the test, as kubelet and the controllers of a real cluster would; each ztunnel
//! pod's admin port is ztunnel's own admin server with a certificate manager holding a real
//! workload certificate, reached through the API server's port-forward.

// Test helpers panic on unexpected output, as the tests themselves do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_testing::apiserver::FakeApiServer;
use ambit_ztunnel::admin::{Admin, AdminServer};
use ambit_ztunnel::certs::local::InProcessCa;
use ambit_ztunnel::certs::{CertConfig, CertManager, TokioClock};
use serde_json::{json, Value};

const NS: &str = "ambit-system";

/// A kubeconfig pointing at `server`.
fn kubeconfig(dir: &Path, server: &FakeApiServer) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path, None).unwrap();
    path
}

/// A self-signed CA certificate valid between the two years.
fn root_pem(from: i32, to: i32) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(to, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

fn ztunnel_pod(name: &str, node: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/name": "ambit-ztunnel"}},
        "spec": {"nodeName": node, "containers": [{"name": "ztunnel", "image": "ambit/ztunnel:test"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

fn deployment(ns: &str, name: &str, ready: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}},
        "status": {"replicas": 1, "readyReplicas": ready},
    })
}

/// ztunnel's admin server holding one workload certificate, signed by a CA of its own; the
/// drain trigger keeps it serving.
async fn ztunnel_admin() -> (SocketAddr, ambit_ztunnel::drain::DrainTrigger) {
    let ca = ambit_hbone::ca::CertificateAuthority::generate(
        "cluster.local",
        Duration::from_secs(3600 * 24 * 365),
    )
    .unwrap();
    let clock = TokioClock::new();
    let certs = CertManager::new(
        InProcessCa::new(Arc::new(ca), clock),
        clock,
        CertConfig::default(),
        None,
    );
    let id: ambit_hbone::Identity = "spiffe://cluster.local/ns/demo/sa/echo".parse().unwrap();
    certs.ensure(&id);
    certs.wait_ready(&id).await.unwrap();
    let server = AdminServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        Admin::new().with_certs(certs),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let (trigger, watcher) = ambit_ztunnel::drain::channel();
    tokio::spawn(server.serve(watcher));
    (addr, trigger)
}

/// An installed, healthy cluster: CRDs applied through the API as `kubectl apply` would.
async fn healthy_cluster() -> (FakeApiServer, Vec<ambit_ztunnel::drain::DrainTrigger>) {
    let server = FakeApiServer::builder()
        .without_group("security.ambit.dev")
        .without_group("traffic.ambit.dev")
        .start()
        .await
        .unwrap();
    for crd in ambit_manifests::crds::all_values() {
        server.apply(&crd).unwrap();
    }
    let apply = |v: Value| {
        server.apply(&v).unwrap();
    };
    apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}));
    apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    for node in ["node1", "node2"] {
        apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
    }
    apply(deployment(NS, "ambit-controller", 1));
    apply(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "ambit-ztunnel", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "ambit-ztunnel"}},
                 "template": {"metadata": {"labels": {"app.kubernetes.io/name": "ambit-ztunnel"}},
                              "spec": {"containers": [{"name": "ztunnel", "image": "ambit/ztunnel:test"}]}}},
    }));
    let mut admins = Vec::new();
    for (pod, node) in [
        ("ambit-ztunnel-aaaaa", "node1"),
        ("ambit-ztunnel-bbbbb", "node2"),
    ] {
        apply(ztunnel_pod(pod, node, true));
        let (addr, trigger) = ztunnel_admin().await;
        admins.push(trigger);
        server.forward_pod(
            NS,
            pod,
            Arc::new(move |port| {
                assert_eq!(port, 15000, "only the admin port is read");
                std::net::TcpStream::connect(addr)
            }),
        );
    }
    apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"gatewayClassName": "ambit-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }));
    apply(deployment("shop", "waypoint", 1));
    apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ambit-root-cert", "namespace": NS},
        "data": {"root-cert.pem": root_pem(2020, 2120)},
    }));
    (server, admins)
}

struct Run {
    ok: bool,
    text: String,
    stderr: String,
}

async fn check(kubeconfig: &Path, json: bool) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ambitctl"));
    cmd.args(["check", "--kubernetes", "--kubeconfig"])
        .arg(kubeconfig);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().await.unwrap();
    Run {
        ok: out.status.success(),
        text: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The check named `name` in a `-o json` report.
fn named<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_cluster_passes_and_each_broken_piece_is_named_with_its_fix() {
    let (server, _admins) = healthy_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &server);

    let run = check(&kc, false).await;
    assert!(run.ok, "{}\n{}", run.text, run.stderr);
    for line in [
        "ok      CRD authorizationpolicies.security.ambit.dev",
        "ok      CRD trafficpolicies.traffic.ambit.dev",
        "ok      controller",
        "ok      ztunnel on node1",
        "ok      ztunnel on node2",
        "ok      certificate spiffe://cluster.local/ns/demo/sa/echo on node1",
        "ok      certificate spiffe://cluster.local/ns/demo/sa/echo on node2",
        "ok      waypoint shop/waypoint",
        "ok      trust root (ambit-system/ambit-root-cert)",
    ] {
        assert!(run.text.contains(line), "{line:?} missing:\n{}", run.text);
    }
    assert!(run.text.contains(", 0 failed"), "{}", run.text);

    // Break three pieces: a CRD deleted, node2's ztunnel not ready, a root near its end.
    server
        .delete(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "",
            "trafficpolicies.traffic.ambit.dev",
        )
        .unwrap();
    server
        .apply(&ztunnel_pod("ambit-ztunnel-bbbbb", "node2", false))
        .unwrap();
    server
        .apply(&json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ambit-root-cert", "namespace": NS},
            "data": {"root-cert.pem": root_pem(1990, 2030)},
        }))
        .unwrap();

    let run = check(&kc, false).await;
    assert!(!run.ok, "{}", run.text);
    assert!(
        run.stderr.contains("3 of 12 checks failed"),
        "{}\n{}",
        run.stderr,
        run.text
    );
    assert!(
        run.text
            .contains("FAIL    CRD trafficpolicies.traffic.ambit.dev"),
        "{}",
        run.text
    );
    let report: Value = serde_json::from_str(&check(&kc, true).await.text).unwrap();
    let crd = named(&report, "CRD trafficpolicies.traffic.ambit.dev");
    assert_eq!(crd["outcome"], "fail");
    assert_eq!(
        crd["detail"],
        "not served: traffic.ambit.dev/v1 is not served"
    );
    assert!(
        crd["fix"]
            .as_str()
            .unwrap()
            .contains("kubectl apply -f manifests/install/01-crds.yaml"),
        "{crd}"
    );
    assert_eq!(
        named(&report, "CRD authorizationpolicies.security.ambit.dev")["outcome"],
        "ok"
    );
    let z = named(&report, "ztunnel on node2");
    assert_eq!(z["outcome"], "fail");
    assert_eq!(
        z["detail"],
        "pod ambit-system/ambit-ztunnel-bbbbb not ready"
    );
    assert!(
        z["fix"]
            .as_str()
            .unwrap()
            .contains("kubectl -n ambit-system logs ambit-ztunnel-bbbbb -c ztunnel"),
        "{z}"
    );
    assert_eq!(named(&report, "ztunnel on node1")["outcome"], "ok");
    let root = named(&report, "trust root (ambit-system/ambit-root-cert)");
    assert_eq!(root["outcome"], "fail", "{root}");
    assert!(
        root["detail"]
            .as_str()
            .unwrap()
            .ends_with("less than a quarter left"),
        "{root}"
    );

    // Without any ztunnel pod on a node, the DaemonSet is what to look at.
    server
        .delete("v1", "Pod", NS, "ambit-ztunnel-bbbbb")
        .unwrap();
    let report: Value = serde_json::from_str(&check(&kc, true).await.text).unwrap();
    let z = named(&report, "ztunnel on node2");
    assert_eq!(
        z["detail"],
        "no ztunnel pod on node2: its enrolled pods are refused"
    );
    assert!(
        z["fix"]
            .as_str()
            .unwrap()
            .contains("kubectl -n ambit-system describe daemonset ambit-ztunnel"),
        "{z}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_ambit_says_to_install_it() {
    let server = FakeApiServer::builder()
        .builtins_only()
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &server);
    let run = check(&kc, true).await;
    assert!(!run.ok);
    let report: Value = serde_json::from_str(&run.text).unwrap();
    for c in report["checks"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let want = if name == "Gateway API" {
            "warn"
        } else {
            "fail"
        };
        assert_eq!(c["outcome"], want, "{c}");
    }
    let controller = named(&report, "controller");
    assert_eq!(
        controller["detail"],
        "Deployment ambit-system/ambit-controller does not exist"
    );
    assert!(
        controller["fix"]
            .as_str()
            .unwrap()
            .contains("ambitctl install | kubectl apply -f -"),
        "{controller}"
    );
}
