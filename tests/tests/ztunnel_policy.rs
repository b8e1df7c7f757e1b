//! ztunnel end to end, enforcement: L4 policy (principal, port), strict mode against
//! plaintext, and a mesh peer with a valid certificate trying to use a pod's HBONE listener
//! for another address or for ztunnel's own ports. Needs root.

mod ztunnel_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::client::{ConnectTarget, Pool, PoolConfig};
use ambit_hbone::tls::{self, TrustBundle};
use ambit_hbone::Identity;
use ambit_tests::{Pod, ReplyServer, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel_support::*;

const OPENED: &str = "istio_tcp_connections_opened_total";

/// Connects from `pod` to `dst` and expects the connection to be closed without the app's
/// greeting (ztunnel refused it).
async fn refused(pod: &Pod, dst: SocketAddr) -> anyhow::Result<()> {
    let pod = pod.clone();
    blocking(move || {
        // The capture accepts the TCP connection locally, so the refusal shows as a close.
        let Ok(mut s) = ambit_tests::connect_from(&pod, dst) else {
            return Ok(());
        };
        match ambit_tests::read_greeting(&mut s) {
            Ok(seen) => anyhow::bail!("{dst} answered {seen:?}: not refused"),
            Err(_) => Ok(()),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allows_denies_by_principal_and_port_and_strict_mode_refuses_plaintext(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_policy")
        .node("n1")
        .node("n2")
        .pod("good", "n1")
        .pod("bad", "n1")
        .pod("plain", "n1")
        .pod("srv", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (good, bad, plain, srv) = (
        topo.pod("good"),
        topo.pod("bad"),
        topo.pod("plain"),
        topo.pod("srv"),
    );
    let state = format!(
        "workloads:\n{}{}{}{}\
policies:
  - name: deny-bad
    namespace: srv
    action: DENY
    rules:
      - from: [{{principals: [\"cluster.local/ns/bad/sa/bad\"]}}]
  - name: deny-admin-port
    namespace: srv
    action: DENY
    rules:
      - to: [{{ports: [9090]}}]
",
        workload(good, "good", "good", "n1", true),
        workload(bad, "bad", "bad", "n1", true),
        workload(plain, "legacy", "default", "n1", false),
        workload(srv, "srv", "srv", "n2", true),
    );
    // n2 runs strict: plaintext to its pods is refused.
    let mesh = Mesh::start(
        &topo,
        &["n1", "n2"],
        &state,
        TestCa::new(Duration::from_secs(3600)),
        |node, c| c.strict_inbound = node == "n2",
    )
    .await?;
    mesh.wait_enrolled("n1", &uid("good", good), true).await?;
    mesh.wait_enrolled("n1", &uid("bad", bad), true).await?;
    mesh.wait_enrolled("n2", &uid("srv", srv), true).await?;
    let web = ReplyServer::start(srv, 8080)?;
    let admin = ReplyServer::start(srv, 9090)?;
    let n2 = mesh.app("n2");

    // Allowed: a principal no rule denies, on an open port.
    let seen = round_trip(good, web.addr(), b"hello").await?;
    assert_eq!(seen.ip(), std::net::IpAddr::from(good.ip));

    // Denied by principal: the app never sees the connection; n2 reports RBAC.
    refused(bad, web.addr()).await?;
    assert_eq!(web.seen().len(), 1, "a denied connection reached the app");
    eventually("RBAC denial counted on n2", || {
        metric(
            n2,
            OPENED,
            &[
                ("reporter", "destination"),
                ("response_flags", "RBAC"),
                ("source_principal", "spiffe://cluster.local/ns/bad/sa/bad"),
            ],
        ) >= 1
    })
    .await?;

    // Denied by port, even for the good principal.
    refused(good, admin.addr()).await?;
    assert!(admin.seen().is_empty(), "port 9090 is denied");

    // Strict mode: plaintext from an un-enrolled client is refused at 15006.
    refused(plain, web.addr()).await?;
    assert_eq!(
        web.seen().len(),
        1,
        "plaintext reached the app in strict mode"
    );
    eventually("plaintext refusal counted on n2", || {
        metric(
            n2,
            OPENED,
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
                ("response_flags", "RBAC"),
            ],
        ) >= 1
    })
    .await?;

    drop((web, admin));
    mesh.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_peer_cannot_spoof_the_destination_or_reach_ztunnel_ports() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_spoof")
        .node("n1")
        .node("n2")
        .pod("attacker", "n1")
        .pod("srv", "n2")
        .pod("other", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (attacker, srv, other) = (topo.pod("attacker"), topo.pod("srv"), topo.pod("other"));
    let state = format!(
        "workloads:\n{}{}{}",
        // The attacker is not enrolled: the test speaks HBONE from its namespace itself.
        workload(attacker, "evil", "evil", "n1", false),
        workload(srv, "srv", "srv", "n2", true),
        workload(other, "srv", "other", "n2", true),
    );
    let mesh = Mesh::start(
        &topo,
        &["n1", "n2"],
        &state,
        TestCa::new(Duration::from_secs(3600)),
        |_, _| {},
    )
    .await?;
    mesh.wait_enrolled("n2", &uid("srv", srv), true).await?;
    mesh.wait_enrolled("n2", &uid("srv", other), true).await?;
    mesh.wait_certs("n2").await?;
    let srv_app = ReplyServer::start(srv, 8080)?;
    let other_app = ReplyServer::start(other, 8080)?;

    // A certificate from the mesh's own CA: the peer is authenticated, only its requests are
    // wrong.
    let evil: Identity = "spiffe://cluster.local/ns/evil/sa/evil".parse()?;
    let cert = mesh.ca.issue(&evil);
    let bundle = TrustBundle::for_workload(&cert)?;
    let srv_id: Identity = "spiffe://cluster.local/ns/srv/sa/srv".parse()?;
    let pool = Pool::with_socket_factory(
        PoolConfig::default(),
        Arc::new(PodSocketFactory::for_pod(attacker)?),
    );
    let hbone = SocketAddr::new(srv.ip.into(), 15008);
    let connect = |authority: SocketAddr| ConnectTarget {
        source: evil.clone(),
        tls: tls::client_config(&cert, &bundle, &srv_id).expect("client config"),
        peer: hbone,
        expected_identity: srv_id.clone(),
        authority,
        headers: http::HeaderMap::new(),
    };

    // Control: the same peer, asking for the pod behind the listener, gets through.
    let mut ok = pool.connect(connect(srv_app.addr())).await?;
    let mut greeting = [0u8; 6];
    ok.read_exact(&mut greeting).await?;
    assert_eq!(&greeting, b"local=");
    ok.shutdown().await?;
    assert_eq!(
        srv_app.seen()[0].peer.ip(),
        std::net::IpAddr::from(attacker.ip)
    );

    // Spoofing: srv's listener asked to reach another pod (same node, same mesh).
    let spoof = pool.connect(connect(other_app.addr())).await;
    let status = spoof.as_ref().err().and_then(|e| e.status());
    assert_eq!(
        status.map(|s| s.as_u16()),
        Some(400),
        "CONNECT for another pod's address must be refused (decision.rs: 400), got {spoof:?}"
    );
    assert!(
        other_app.seen().is_empty(),
        "the spoofed CONNECT reached another pod"
    );

    // ztunnel's own ports on the pod: refused, never looped into.
    for port in [15008, 15001, 15006] {
        let target = SocketAddr::new(srv.ip.into(), port);
        let result = pool.connect(connect(target)).await;
        assert_eq!(
            result
                .as_ref()
                .err()
                .and_then(|e| e.status())
                .map(|s| s.as_u16()),
            Some(400),
            "CONNECT to {target} must be refused, got {result:?}"
        );
    }
    assert_eq!(srv_app.seen().len(), 1);

    drop((srv_app, other_app));
    mesh.shutdown().await;
    Ok(())
}
