//! ztunnel end to end, traffic: two nodes, pods on each, one in-process ztunnel per node
//! (real netns, iptables, TLS). Needs root; see `ambit_tests::require_root`.

use std::net::{IpAddr, SocketAddr};

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{ReplyServer, Topology};

const OPENED: &str = "istio_tcp_connections_opened_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_each_other_over_hbone_with_real_ips_and_plain_pods_are_unaffected(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_traffic")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("local", "n1")
        .pod("remote", "n2")
        .pod("plain-c", "n1")
        .pod("plain-s", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, local, remote) = (topo.pod("client"), topo.pod("local"), topo.pod("remote"));
    let (plain_c, plain_s) = (topo.pod("plain-c"), topo.pod("plain-s"));
    let state = format!(
        "workloads:\n{}{}{}{}{}",
        workload(client, "app", "client", "n1", true),
        workload(local, "app", "server", "n1", true),
        workload(remote, "app", "server", "n2", true),
        workload(plain_c, "legacy", "default", "n1", false),
        workload(plain_s, "legacy", "default", "n2", false),
    );
    let mesh = Mesh::two_nodes(&topo, &state).await?;
    for (node, pod) in [("n1", client), ("n1", local), ("n2", remote)] {
        mesh.wait_enrolled(node, &uid("app", pod), true).await?;
    }
    let local_srv = ReplyServer::start(local, 8080)?;
    let remote_srv = ReplyServer::start(remote, 8080)?;
    let plain_srv = ReplyServer::start(plain_s, 8080)?;
    let client_ip = IpAddr::from(client.ip);

    // Same node: through ztunnel (HBONE to the pod's own 15008), the app sees the client.
    let seen = round_trip(client, local_srv.addr(), b"same-node").await?;
    assert_eq!(seen.ip(), client_ip, "the server sees the client's real IP");

    // Across nodes, with the fabric watched: TLS on the wire, never the payload.
    let fabric = topo.namespaces()[0].clone();
    let sniffer = Sniffer::start(&fabric)?;
    let secret = b"SECRET-PAYLOAD-0123456789";
    let seen = round_trip(client, remote_srv.addr(), secret).await?;
    assert_eq!(
        seen.ip(),
        client_ip,
        "the remote server sees the client's real IP"
    );
    let wire = sniffer.bytes();
    drop(sniffer);
    assert!(!wire.is_empty(), "the sniffer saw nothing on the fabric");
    assert!(
        contains(&wire, &[0x16, 0x03]),
        "no TLS handshake record on the fabric"
    );
    assert!(
        !contains(&wire, secret),
        "payload crossed the fabric in plaintext"
    );
    assert!(
        !contains(&wire, b"local=10.77"),
        "the reply crossed in plaintext"
    );

    // Both ztunnels counted it as mTLS with the expected identities.
    let n1 = mesh.app("n1");
    let n2 = mesh.app("n2");
    let src = "spiffe://cluster.local/ns/app/sa/client";
    let dst = "spiffe://cluster.local/ns/app/sa/server";
    let out_labels = [
        ("reporter", "source"),
        ("source_principal", src),
        ("destination_principal", dst),
        ("destination_workload", "remote"),
        ("connection_security_policy", "mutual_tls"),
    ];
    eventually("outbound metrics on n1", || {
        metric(n1, OPENED, &out_labels) >= 1
    })
    .await?;
    let in_labels = [
        ("reporter", "destination"),
        ("source_principal", src),
        ("destination_principal", dst),
        ("connection_security_policy", "mutual_tls"),
    ];
    eventually("inbound metrics on n2", || {
        metric(n2, OPENED, &in_labels) >= 1
    })
    .await?;
    eventually("bytes counted", || {
        metric(n1, "istio_tcp_received_bytes_total", &out_labels) >= secret.len() as u64
    })
    .await?;

    // Un-enrolled pods talk plain TCP, untouched by either ztunnel.
    let before = metric(n1, OPENED, &[]) + metric(n2, OPENED, &[]);
    let seen = round_trip(plain_c, plain_srv.addr(), b"plain").await?;
    assert_eq!(seen.ip(), IpAddr::from(plain_c.ip));
    assert_eq!(metric(n1, OPENED, &[]) + metric(n2, OPENED, &[]), before);

    // An enrolled client to an un-enrolled server: passthrough from the pod's own IP.
    let seen = round_trip(client, plain_srv.addr(), b"passthrough").await?;
    assert_eq!(seen.ip(), client_ip);
    eventually("passthrough counted", || {
        metric(
            n1,
            OPENED,
            &[
                ("reporter", "source"),
                ("connection_security_policy", "none"),
            ],
        ) >= 1
    })
    .await?;

    drop((local_srv, remote_srv, plain_srv));
    mesh.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_vip_spreads_over_endpoints_and_skips_a_removed_one() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_vip")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("web-0", "n2")
        .pod("web-1", "n2")
        .pod("web-2", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let client = topo.pod("client");
    let webs = [topo.pod("web-0"), topo.pod("web-1"), topo.pod("web-2")];
    let state_with = |endpoints: &[&str]| {
        let mut s = String::from("workloads:\n");
        s += &workload(client, "app", "client", "n1", true);
        for w in &webs {
            s += &workload(w, "app", "web", "n2", true);
        }
        s += "services:\n  - name: web\n    namespace: app\n    vips: [10.96.0.10]\n    ports: [{port: 80, targetPort: 8080}]\n    endpoints:\n";
        for e in endpoints {
            s += &format!("      - {{workloadUid: app/{e}}}\n");
        }
        s
    };
    let all = state_with(&["web-0", "web-1", "web-2"]);
    let mesh = Mesh::two_nodes(&topo, &all).await?;
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    for w in &webs {
        mesh.wait_enrolled("n2", &uid("app", w), true).await?;
    }
    let servers: Vec<ReplyServer> = webs
        .iter()
        .map(|w| ReplyServer::start(w, 8080))
        .collect::<Result<_, _>>()?;
    let vip: SocketAddr = "10.96.0.10:80".parse()?;

    for i in 0..60 {
        let seen = round_trip(client, vip, format!("req-{i}").as_bytes()).await?;
        assert_eq!(seen.ip(), IpAddr::from(client.ip));
    }
    let counts: Vec<usize> = servers.iter().map(|s| s.seen().len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 60, "{counts:?}");
    assert!(
        counts.iter().all(|&c| c >= 5),
        "every endpoint gets a share of 60 connections: {counts:?}"
    );
    eventually("service label on outbound metrics", || {
        metric(
            mesh.app("n1"),
            OPENED,
            &[("destination_service", "web.app.svc.cluster.local")],
        ) >= 60
    })
    .await?;

    // web-2 leaves the service: no new connection goes there.
    mesh.set_state(&state_with(&["web-0", "web-1"])).await?;
    let before = servers[2].seen().len();
    for i in 0..30 {
        round_trip(client, vip, format!("after-{i}").as_bytes()).await?;
    }
    assert_eq!(
        servers[2].seen().len(),
        before,
        "removed endpoint still chosen"
    );
    assert_eq!(
        servers[0].seen().len() + servers[1].seen().len(),
        counts[0] + counts[1] + 30
    );

    drop(servers);
    mesh.shutdown().await;
    Ok(())
}
