//! `ambitctl dashboard --kubernetes` against the fake API server: the loopback port it prints
//! reaches a running controller pod's operations port through the API server's port-forward
//! (the real WebSocket protocol, through kube-rs), request and response intact, and a pod that
//! is not running is never chosen.

// Test helpers panic on unexpected output, as the tests themselves do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use ambit_testing::apiserver::FakeApiServer;
use serde_json::json;

const NS: &str = "ambit-system";

/// A kubeconfig pointing at `server`.
fn kubeconfig(dir: &Path, server: &FakeApiServer) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path, None).unwrap();
    path
}

fn controller_pod(name: &str, phase: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/name": "ambit-controller"}},
        "spec": {"containers": [{"name": "controller", "image": "ambit/controller:test"}]},
        "status": {"phase": phase},
    })
}

/// A stand-in for one controller replica's operations port: answers every request with a
/// page naming `replica` and records the request lines it saw.
fn ops_port(replica: &'static str, seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            seen.lock().unwrap().push(line.trim().to_owned());
            // The rest of the head.
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let body = format!("<h1>ambit dashboard of {replica}</h1>");
            let mut conn = conn;
            write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_url_reaches_a_running_controller_through_the_api_server() {
    let server = FakeApiServer::builder().start().await.unwrap();
    server
        .apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
        .unwrap();
    // The first replica in the list is still pending: forwarding to it would fail.
    server
        .apply(&controller_pod("ambit-controller-a-pending", "Pending"))
        .unwrap();
    server
        .apply(&controller_pod("ambit-controller-b", "Running"))
        .unwrap();
    let pending_seen = Arc::new(Mutex::new(Vec::new()));
    let running_seen = Arc::new(Mutex::new(Vec::new()));
    for (pod, replica, seen) in [
        (
            "ambit-controller-a-pending",
            "pending",
            pending_seen.clone(),
        ),
        ("ambit-controller-b", "replica b", running_seen.clone()),
    ] {
        let addr = ops_port(replica, seen);
        server.forward_pod(
            NS,
            pod,
            Arc::new(move |port| {
                assert_eq!(port, 15014, "only the operations port is forwarded");
                std::net::TcpStream::connect(addr)
            }),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &server);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambitctl"))
        .args(["dashboard", "--kubernetes", "--port", "0", "--kubeconfig"])
        .arg(&kc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let url = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    })
    .await
    .unwrap();
    let outcome = async {
        let rest = url
            .strip_prefix("http://")
            .and_then(|r| r.strip_suffix("/dashboard"))
            .unwrap_or_else(|| panic!("not a dashboard URL: {url:?}"));
        let addr: SocketAddr = rest.parse().unwrap();
        assert!(addr.ip().is_loopback(), "{url}");
        // Twice: each connection gets its own forward.
        for _ in 0..2 {
            let (status, body) = ambit_testing::http_get_async(addr, "/dashboard")
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("ambit dashboard of replica b"), "{body}");
        }
    };
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), outcome).await;
    let _ = child.kill();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let _ = child.wait();
    assert!(result.is_ok(), "timed out; ambitctl said: {stderr}");
    assert_eq!(
        *running_seen.lock().unwrap(),
        ["GET /dashboard HTTP/1.1", "GET /dashboard HTTP/1.1"],
        "{stderr}"
    );
    assert!(pending_seen.lock().unwrap().is_empty(), "{stderr}");
}
