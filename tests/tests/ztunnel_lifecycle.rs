//! ztunnel end to end, lifecycle: certificate rotation under an open connection,
//! enrolling / un-enrolling a namespace while the apps keep running, and a pod that left the
//! mesh while its ztunnel was down, released at the next start (and no other). Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ambit_hbone::tls::TrustBundle;
use ambit_hbone::Identity;
use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{exec_in, Pod, ReplyServer, Topology};

const OPENED: &str = "istio_tcp_connections_opened_total";

/// The leaf certificate a pod's HBONE listener presents to a new connection, as DER.
async fn presented_leaf(
    from: &Pod,
    to: &Pod,
    cert: &ambit_hbone::cert::WorkloadCertificate,
    expected: &Identity,
) -> anyhow::Result<Vec<u8>> {
    let bundle = TrustBundle::for_workload(cert)?;
    let config = ambit_hbone::tls::client_config(cert, &bundle, expected)?;
    let factory = PodSocketFactory::for_pod(from)?;
    let socket = ambit_hbone::client::SocketFactory::new_socket(
        &factory,
        cert.identity(),
        SocketAddr::new(to.ip.into(), 15008),
    )?;
    let tcp = socket.connect(SocketAddr::new(to.ip.into(), 15008)).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ambit_hbone::tls::server_name(), tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or_else(|| anyhow::anyhow!("no server certificate"))?;
    Ok(leaf)
}

fn serial(der: &[u8]) -> anyhow::Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)?;
    Ok(cert.raw_serial_as_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_an_open_connection() -> anyhow::Result<()> {
    let Some(topo) = Topology::client_and_server("zt_rotate")
        .pod("probe", "n1")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, srv, probe) = (topo.pod("client"), topo.pod("srv"), topo.pod("probe"));
    let state = format!(
        "workloads:\n{}{}{}",
        workload(client, "app", "client", "n1", true),
        workload(srv, "app", "srv", "n2", true),
        workload(probe, "probe", "probe", "n1", false),
    );
    // 16 s certificates: rotation at 8 s.
    let ca = TestCa::new(Duration::from_secs(16));
    let mesh = Mesh::start(&topo, &["n1", "n2"], &state, ca, |_, _| {}).await?;
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    mesh.wait_enrolled("n2", &uid("app", srv), true).await?;
    mesh.wait_certs("n2").await?;
    let app = ReplyServer::start(srv, 8080)?;
    let srv_id: Identity = "spiffe://cluster.local/ns/app/sa/srv".parse()?;
    let probe_cert = mesh
        .ca
        .issue(&"spiffe://cluster.local/ns/probe/sa/probe".parse()?);
    let first_leaf = presented_leaf(probe, srv, &probe_cert, &srv_id).await?;

    // A long connection through both ztunnels.
    let (c, dst) = (client.clone(), app.addr());
    let mut long = blocking(move || {
        let mut s = ambit_tests::connect_from(&c, dst)?;
        ambit_tests::read_greeting(&mut s)?;
        Ok(s)
    })
    .await?;
    long.write_all(b"before")?;
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf)?;
    assert_eq!(&buf, b"before");

    // Both sides rotate (bounded wait: half of 16 s, plus slack).
    let n2 = mesh.app("n2");
    let serial_of = |app: &ambit_ztunnel::app::App| {
        app.certs()
            .status()
            .into_iter()
            .map(|s| s.serial)
            .collect::<Vec<_>>()
    };
    let before = serial_of(n2);
    let issued = mesh.ca.issued.clone();
    let initial = issued.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    while serial_of(n2) == before || issued.load(std::sync::atomic::Ordering::Relaxed) < initial + 2
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no rotation within 25 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The open connection keeps carrying bytes after rotation.
    let mut long = blocking(move || {
        long.write_all(b"after!")?;
        let mut buf = [0u8; 6];
        long.read_exact(&mut buf)?;
        anyhow::ensure!(&buf == b"after!", "echo after rotation");
        Ok(long)
    })
    .await?;

    // A new connection is served with the new certificate.
    let second_leaf = presented_leaf(probe, srv, &probe_cert, &srv_id).await?;
    assert_ne!(
        serial(&first_leaf)?,
        serial(&second_leaf)?,
        "a new connection must see the rotated certificate"
    );
    let seen = round_trip(client, app.addr(), b"fresh").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));
    long.write_all(b"still!")?;
    long.read_exact(&mut buf)?;
    assert_eq!(&buf, b"still!");

    drop(long);
    drop(app);
    mesh.shutdown().await;
    Ok(())
}

fn capture_rules(pod: &Pod) -> anyhow::Result<String> {
    exec_in(&pod.netns, &["iptables-save"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_and_unenrolling_a_namespace_needs_no_app_restart() -> anyhow::Result<()> {
    let Some(topo) = Topology::client_and_server("zt_enroll").build_or_skip() else {
        return Ok(());
    };
    let (client, srv) = (topo.pod("client"), topo.pod("srv"));
    let state = |enrolled: bool| {
        format!(
            "workloads:\n{}{}",
            workload(client, "shop", "client", "n1", enrolled),
            workload(srv, "shop", "srv", "n2", enrolled),
        )
    };
    let mesh = Mesh::two_nodes(&topo, &state(true)).await?;
    let (cuid, suid) = (uid("shop", client), uid("shop", srv));
    mesh.wait_enrolled("n1", &cuid, true).await?;
    mesh.wait_enrolled("n2", &suid, true).await?;
    // One app process (socket) for the whole test: never restarted.
    let app = ReplyServer::start(srv, 8080)?;
    let hbone_out = |mesh: &Mesh| {
        metric(
            mesh.app("n1"),
            OPENED,
            &[
                ("reporter", "source"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    let hbone_in = |mesh: &Mesh| metric(mesh.app("n2"), OPENED, &[("reporter", "destination")]);

    // Enrolled: HBONE.
    round_trip(client, app.addr(), b"one").await?;
    eventually("HBONE counted", || {
        hbone_out(&mesh) == 1 && hbone_in(&mesh) == 1
    })
    .await?;
    assert!(capture_rules(client)?.contains("AMBIT_OUTPUT"));

    // The namespace loses its label: protocol TCP. Capture goes away, the app stays.
    mesh.set_state(&state(false)).await?;
    mesh.wait_enrolled("n1", &cuid, false).await?;
    mesh.wait_enrolled("n2", &suid, false).await?;
    eventually("rules removed", || {
        capture_rules(client).is_ok_and(|r| !r.contains("AMBIT_"))
            && capture_rules(srv).is_ok_and(|r| !r.contains("AMBIT_"))
    })
    .await?;
    let seen = round_trip(client, app.addr(), b"two").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));
    assert_eq!(
        (hbone_out(&mesh), hbone_in(&mesh)),
        (1, 1),
        "un-enrolled traffic must not go through ztunnel"
    );
    // The server saw that connection arrive directly: its local address is the pod's own.
    assert_eq!(app.seen().len(), 2);

    // Re-enrolled: HBONE again, same app.
    mesh.set_state(&state(true)).await?;
    mesh.wait_enrolled("n1", &cuid, true).await?;
    mesh.wait_enrolled("n2", &suid, true).await?;
    let seen = round_trip(client, app.addr(), b"three").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));
    eventually("HBONE again", || {
        hbone_out(&mesh) == 2 && hbone_in(&mesh) == 2
    })
    .await?;
    assert_eq!(app.seen().len(), 3);

    drop(app);
    mesh.shutdown().await;
    // Stopping ztunnel is not un-enrolling: the pods stay captured (refused until a ztunnel
    // serves them again).
    assert!(capture_rules(client)?.contains("AMBIT_OUTPUT"));
    assert!(capture_rules(srv)?.contains("AMBIT_PRERT"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_left_the_mesh_while_ztunnel_was_down_is_released_at_start_and_no_other(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_sweep")
        .node("n1")
        .node("n2")
        .pod("left", "n1")
        .pod("ghost", "n1")
        .pod("far", "n2")
        .pod("srv", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (left, ghost, far, srv) = (
        topo.pod("left"),
        topo.pod("ghost"),
        topo.pod("far"),
        topo.pod("srv"),
    );
    let before = format!(
        "workloads:\n{}{}{}{}",
        workload(left, "shop", "left", "n1", true),
        workload(ghost, "shop", "ghost", "n1", true),
        workload(far, "shop", "far", "n2", true),
        workload(srv, "legacy", "default", "n2", false),
    );
    let mesh = Mesh::two_nodes(&topo, &before).await?;
    mesh.wait_enrolled("n1", &uid("shop", left), true).await?;
    mesh.wait_enrolled("n1", &uid("shop", ghost), true).await?;
    mesh.wait_enrolled("n2", &uid("shop", far), true).await?;
    // Both ztunnels stop: every pod stays captured.
    mesh.shutdown().await;
    for pod in [left, ghost, far] {
        assert!(
            captured(pod),
            "{} lost its rules when ztunnel stopped",
            pod.name
        );
    }

    // Meanwhile `left`'s namespace lost its label, and `ghost` is no longer in the state (the
    // controller has not published it, or it is going away). n1's ztunnel starts alone.
    let after = format!(
        "workloads:\n{}{}{}",
        workload(left, "legacy", "left", "n1", false),
        workload(far, "shop", "far", "n2", true),
        workload(srv, "legacy", "default", "n2", false),
    );
    let app = ReplyServer::start(srv, 8080)?;
    let ca = TestCa::new(Duration::from_secs(3600));
    let mesh = Mesh::start(&topo, &["n1"], &after, ca, |_, _| {}).await?;
    eventually("left's rules removed by the start-up sweep", || {
        !captured(left)
    })
    .await?;
    // `left` reaches a plain server directly again: the server sees its own address.
    let seen = round_trip(left, app.addr(), b"released").await?;
    assert_eq!(seen.ip(), IpAddr::from(left.ip));
    // The sweep decides on one snapshot taken before it removes anything, and runs once: what
    // it leaves is left for good. A pod the state does not know and another node's pod stay
    // closed.
    assert!(
        captured(ghost),
        "the sweep opened a pod the state does not know"
    );
    assert!(captured(far), "the sweep opened another node's pod");
    mesh.shutdown().await;
    Ok(())
}
