//! The waypoint in a real mesh: network namespaces, in-process ztunnels (in-pod capture,
//! iptables, TLS), and the waypoint itself running inside its own pod's namespace.
//!
//! client pod (n1) → captured by ztunnel n1 → HBONE to the waypoint pod (the server is
//! behind it) → waypoint: L7 policy, then HBONE as the waypoint to the server pod's
//! ztunnel (n2), which only accepts it because it comes from the waypoint → server pod.
//! Needs root; see `ambit_tests::require_root`.

mod ztunnel_support;

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{Server, ServerSettings};
use ambit_hbone::tls::{self, RotatingCert, TrustBundle};
use ambit_hbone::Identity;
use ambit_tests::Topology;
use ambit_waypoint::metrics::Metrics;
use ambit_waypoint::proxy::Proxy;
use ambit_waypoint::server::{Limits, Waypoint};
use ambit_waypoint::state::{State, StateFile, StateHandle};
use ambit_waypoint::upstream::Upstreams;
use anyhow::Context as _;
use ztunnel_support::*;

/// A blocking HTTP/1.1 server inside `pod` answering with the request head it received.
fn http_server(pod: &ambit_tests::Pod, port: u16) -> anyhow::Result<SocketAddr> {
    let addr = SocketAddr::new(pod.ip.into(), port);
    let ns = pod.netns.clone();
    let listener = ambit_tests::in_netns(&ns, move || std::net::TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let body = format!("peer={peer}\n{}", String::from_utf8_lossy(&head));
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    Ok(addr)
}

/// Sends one request from `pod` to `dst` and returns the whole response.
async fn http_from(pod: &ambit_tests::Pod, dst: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (pod, path) = (pod.clone(), path.to_string());
    blocking(move || {
        let mut s = ambit_tests::connect_from(&pod, dst)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cross_the_waypoint_with_l7_policy() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("wp_mesh")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("waypoint", "n1")
        .pod("server", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, wp, server) = (topo.pod("client"), topo.pod("waypoint"), topo.pod("server"));
    let wp_id = Identity::new("cluster.local", "app", "waypoint")?;
    let state = format!(
        "workloads:\n{}{}  - name: {}\n    namespace: app\n    serviceAccount: server\n    node: n2\n    addresses: [{}]\n    protocol: HBONE\n    waypoint: {{address: {}, identity: \"{wp_id}\"}}\n",
        workload(client, "app", "client", "n1", true),
        // The waypoint pod is not captured: it speaks HBONE itself.
        workload(wp, "app", "waypoint", "n1", false).replace(
            "    protocol: TCP\n",
            "    protocol: TCP\n    isWaypoint: true\n"
        ),
        server.name,
        server.ip,
        wp.ip,
    );
    let ca = TestCa::new(Duration::from_secs(3600));
    let mesh = Mesh::start(&topo, &["n1", "n2"], &state, ca.clone(), |_, _| {}).await?;
    for (node, pod) in [("n1", client), ("n2", server)] {
        mesh.wait_enrolled(node, &uid("app", pod), true).await?;
    }
    let server_addr = http_server(server, 8080)?;

    // The waypoint, on its own runtime in the waypoint pod's namespace.
    let waypoint_state = format!(
        r#"
workloads:
  - {{uid: client, name: client, namespace: app, serviceAccount: client, addresses: [{}]}}
  - {{uid: server, name: server, namespace: app, serviceAccount: server, addresses: [{}]}}
policies:
  - name: no-admin
    namespace: app
    action: DENY
    targetGateway: app/waypoint
    rules: [{{to: [{{paths: ["/admin/*"]}}]}}]
"#,
        client.ip, server.ip
    );
    let file: StateFile = serde_yaml::from_str(&waypoint_state)?;
    let handle = StateHandle::new(State::build(file)?);
    let cert = ca.issue(&wp_id);
    let bundle = TrustBundle::new("cluster.local", ca.ca.trust_roots())?;
    let rotating = RotatingCert::new(&cert);
    let listen = SocketAddr::new(wp.ip.into(), 15008);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ns = wp.netns.clone();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<()>();
    let wp_thread = std::thread::spawn(move || {
        ambit_tests::in_netns(&ns, move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut registry = prometheus_client::registry::Registry::default();
                let upstreams = Upstreams::new(
                    Pool::new(PoolConfig::default()),
                    wp_id.clone(),
                    rotating.clone(),
                    bundle.clone(),
                    15008,
                );
                let proxy = Proxy::new(
                    handle,
                    upstreams,
                    Metrics::new(&mut registry),
                    "app/waypoint".into(),
                );
                let listener = tokio::net::TcpListener::bind(listen).await?;
                let _ = bound_tx.send(());
                let server = Server::new(
                    listener,
                    tls::server_config_rotating(&rotating, &bundle)?,
                    Waypoint {
                        proxy,
                        limits: Limits::default(),
                    },
                    ServerSettings::default(),
                );
                server
                    .run(async move {
                        let _ = stop_rx.await;
                    })
                    .await;
                anyhow::Ok(())
            })
        })
    });

    bound_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the waypoint did not bind 15008 in its pod")?;
    mesh.wait_certs("n1").await?;
    mesh.wait_certs("n2").await?;
    let ok = http_from(client, server_addr, "/hello")
        .await
        .context("allowed request")?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("x-ambit-peer-identity: spiffe://cluster.local/ns/app/sa/client"),
        "{ok}"
    );
    assert!(
        ok.contains(&format!("forwarded: for={}", client.ip)),
        "{ok}"
    );
    let denied = http_from(client, server_addr, "/admin/users")
        .await
        .context("denied request")?;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied.ends_with("RBAC: access denied by app/no-admin\n"),
        "{denied}"
    );

    let _ = stop_tx.send(());
    let joined = wp_thread
        .join()
        .map_err(|_| anyhow::anyhow!("waypoint thread panicked"))?;
    joined??;
    mesh.shutdown().await;
    Ok(())
}
