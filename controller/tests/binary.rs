//! The `ambit-controller` binary as an operator runs it: clear errors for bad flags,
//! serving a folder's state to a subscriber over TLS with a node credential, metrics, and
//! a clean exit on SIGTERM.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ambit_proto::discovery::discovery_client::DiscoveryClient;
use ambit_proto::discovery::{resource, subscribe_request, Hello, ProxyKind, SubscribeRequest};
use ambit_testing::{free_port, http_get_async, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_ambit-controller");

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
    let listen = format!("127.0.0.1:{}", free_port()?);
    let ops_port = free_port()?;
    let state = tempfile::tempdir()?;
    let mut child = Proc::adopt(
        Command::new(BIN)
            .args([
                "--local-dir",
                &dir.path().to_string_lossy(),
                "--listen",
                &listen,
                "--ops-listen",
                &format!("127.0.0.1:{ops_port}"),
                "--state-dir",
                &state.path().to_string_lossy(),
                "--nodes",
                "n1",
                "--log-format",
                "json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // The controller writes the mesh root and the node's credential, then listens (TLS).
    let identity: ambit_hbone::Identity =
        "spiffe://cluster.local/ns/ambit-system/sa/ambit-controller".parse()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut client, token) = loop {
        let root = std::fs::read_to_string(state.path().join("ca/root-cert.pem"));
        let token = std::fs::read_to_string(state.path().join("credentials/n1.token"));
        if let (Ok(root), Ok(token)) = (root, token) {
            let channel = ambit_hbone::control::channel(&listen, &root, &identity)?;
            let mut client = DiscoveryClient::new(channel);
            let probe = tonic::Request::new(tokio_stream::iter(Vec::new()));
            // Unauthenticated means the server answered: it is up.
            match client.subscribe(probe).await {
                Err(s) if s.code() == tonic::Code::Unauthenticated => break (client, token),
                _ => {}
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("controller never served");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hello = SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(Hello {
            kind: ProxyKind::Ztunnel as i32,
            node: "n1".into(),
            ..Hello::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let mut pushes = client.subscribe(request).await?.into_inner();
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

    let ops = SocketAddr::from(([127, 0, 0, 1], ops_port));
    let (_, metrics) = http_get_async(ops, "/metrics").await?;
    assert!(
        metrics.contains(r#"ambit_connected_proxies{kind="ztunnel"} 1"#),
        "{metrics}"
    );
    assert_eq!(http_get_async(ops, "/ready").await?.0, 200);

    // SIGTERM: the subscriber's stream ends cleanly and the process exits 0.
    let killed = Command::new("kill")
        .args(["-TERM", &child.child.id().to_string()])
        .status()?;
    anyhow::ensure!(killed.success(), "kill -TERM failed");
    let end = tokio::time::timeout(Duration::from_secs(10), pushes.message()).await?;
    assert!(matches!(end, Ok(None)), "{end:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.child.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    drop(tx);
    Ok(())
}
