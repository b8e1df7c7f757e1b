//! The `ambit-controller` binary as an operator runs it: clear errors for bad flags, and
//! serving a folder's state to a subscriber.

use std::process::{Command, Stdio};
use std::time::Duration;

use ambit_proto::discovery::discovery_client::DiscoveryClient;
use ambit_proto::discovery::{resource, subscribe_request, Hello, ProxyKind, SubscribeRequest};

const BIN: &str = env!("CARGO_BIN_EXE_ambit-controller");

/// Kills the child when the test ends, also on panic.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_missing_folder_is_a_clear_error() {
    let out = Command::new(BIN)
        .args([
            "--local-dir",
            "/nonexistent/ambit",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--local-dir /nonexistent/ambit: not a directory"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serves_a_folder() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("mesh.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {ambit.dev/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.1.0.1}\n",
    )?;
    // A free port: bind, read it, release it for the controller.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let _child = Child(
        Command::new(BIN)
            .args([
                "--local-dir",
                &dir.path().to_string_lossy(),
                "--listen",
                &listen,
                "--log-format",
                "json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let channel = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("controller never listened: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let hello = SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(Hello {
            kind: ProxyKind::Ztunnel as i32,
            node: "n1".into(),
            ..Hello::default()
        })),
    };
    let mut pushes = DiscoveryClient::new(channel)
        .subscribe(tokio_stream::iter(vec![hello]))
        .await?
        .into_inner();
    let push = tokio::time::timeout(Duration::from_secs(10), pushes.message())
        .await??
        .expect("push");
    assert!(push.full_state);
    let workloads: Vec<_> = push
        .upserts
        .iter()
        .filter_map(|r| match &r.kind {
            Some(resource::Kind::Workload(w)) => {
                Some((w.uid.as_str(), w.node.as_str(), w.tunnel_protocol))
            }
            _ => None,
        })
        .collect();
    assert_eq!(workloads, vec![("demo/a", "n1", 1)]);
    Ok(())
}
