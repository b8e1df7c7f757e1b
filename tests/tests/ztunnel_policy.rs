//! ztunnel end to end, enforcement: L4 policy (principal, port), strict mode against
//! plaintext, a mesh peer with a valid certificate trying to use a pod's HBONE listener
//! for another address or for ztunnel's own ports, and a DENY applied while connections are
//! open. Logs and metrics name only proven identities. Needs root.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_hbone::client::ConnectTarget;
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::tls::{self, TrustBundle};
use ambit_hbone::Identity;
use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{Pod, ReplyServer, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPENED: &str = "istio_tcp_connections_opened_total";

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
    let log = access_log();
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
    // Nothing proves who the plaintext client is: no principal, only the workload its
    // address belongs to (what Istio's ambient dashboards draw edges with).
    eventually("plaintext refusal counted on n2", || {
        metric(
            n2,
            OPENED,
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
                ("response_flags", "RBAC"),
                ("source_principal", "unknown"),
                ("source_workload", "plain"),
            ],
        ) >= 1
    })
    .await?;
    // Tests of this binary share the log and pod addresses: the namespaces tell them apart.
    let plain_addr = format!("\"src.addr\":\"{}:", plain.ip);
    let to_srv = "\"dst.workload\":\"srv/srv\"";
    // Refusal lines are throttled per cause (this one shares "inbound RBAC" with bad's), so
    // the line may be left out; any that is written names no identity. The revocation test
    // asserts a served plaintext connection's line, which is never throttled.
    for line in access_lines(&log, &[&plain_addr, to_srv]) {
        assert_eq!(line["src.identity"], "unknown", "{line}");
        assert_eq!(line["src.workload"], "-", "{line}");
        assert_eq!(line["src.workload_by_ip"], "legacy/plain", "{line}");
    }
    // The HBONE client's line names the identity its certificate proved.
    let bad_addr = format!("\"src.addr\":\"{}:", bad.ip);
    let bad_lines = access_lines(&log, &[&bad_addr, to_srv]);
    assert!(!bad_lines.is_empty(), "no inbound line for bad");
    for line in bad_lines {
        assert_eq!(
            line["src.identity"], "spiffe://cluster.local/ns/bad/sa/bad",
            "{line}"
        );
        assert_eq!(line["src.workload"], "bad/bad", "{line}");
    }
    assert_eq!(
        metric(
            n2,
            OPENED,
            &[(
                "source_principal",
                "spiffe://cluster.local/ns/legacy/sa/default"
            )]
        ),
        0,
        "a principal guessed from an address reached the metrics"
    );

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
    let mesh = Mesh::two_nodes(&topo, &state).await?;
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

/// Reads from `s` until the peer closes it; fails if it is still open at `deadline`. Returns
/// when it closed, measured from `since`.
fn closed_by(
    s: &mut std::net::TcpStream,
    since: Instant,
    deadline: Instant,
) -> anyhow::Result<Duration> {
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(
            !left.is_zero(),
            "still open {:?} after the DENY",
            deadline - since
        );
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(since.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            // A reset is a close too.
            Err(_) => return Ok(since.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_applied_later_closes_the_open_connections_it_matches() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_revoke")
        .node("n1")
        .node("n2")
        .pod("victim", "n1")
        .pod("keeper", "n1")
        .pod("plain", "n1")
        .pod("srv", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (victim, keeper, plain, srv) = (
        topo.pod("victim"),
        topo.pod("keeper"),
        topo.pod("plain"),
        topo.pod("srv"),
    );
    let workloads = format!(
        "workloads:\n{}{}{}{}",
        workload(victim, "rv-app", "victim", "n1", true),
        workload(keeper, "rv-app", "keeper", "n1", true),
        workload(plain, "rv-legacy", "default", "n1", false),
        workload(srv, "rv-srv", "srv", "n2", true),
    );
    // One rule for the HBONE victim (its proven principal), one for the plaintext one (its
    // address: it has no principal).
    let with_deny = format!(
        "{workloads}\
policies:
  - name: deny-later
    namespace: rv-srv
    action: DENY
    rules:
      - from: [{{principals: [\"cluster.local/ns/rv-app/sa/victim\"]}}]
      - from: [{{ipBlocks: [\"{}/32\"]}}]
",
        plain.ip
    );
    // Tests of this binary share the log and pod addresses: the namespaces tell them apart.
    const TO_SRV: &str = "\"dst.workload\":\"rv-srv/srv\"";
    let log = access_log();
    let mesh = Mesh::two_nodes(&topo, &workloads).await?;
    for (node, ns, pod) in [
        ("n1", "rv-app", victim),
        ("n1", "rv-app", keeper),
        ("n2", "rv-srv", srv),
    ] {
        mesh.wait_enrolled(node, &uid(ns, pod), true).await?;
    }
    let app = ReplyServer::start(srv, 8080)?;
    let dst = app.addr();

    // Three long-lived connections, each proven to carry bytes.
    let open = |pod: &ambit_tests::Pod| {
        let pod = pod.clone();
        blocking(move || {
            let mut s = ambit_tests::connect_from(&pod, dst)?;
            ambit_tests::read_greeting(&mut s)?;
            anyhow::ensure!(ambit_tests::echo(&mut s, b"before")? == b"before");
            Ok(s)
        })
    };
    let mut hbone_victim = open(victim).await?;
    let mut plain_victim = open(plain).await?;
    let mut kept = open(keeper).await?;
    let n2 = mesh.app("n2");
    // Identities as proven: the HBONE clients by certificate, the plaintext one not at all.
    for (principal, security) in [
        ("spiffe://cluster.local/ns/rv-app/sa/victim", "mutual_tls"),
        ("spiffe://cluster.local/ns/rv-app/sa/keeper", "mutual_tls"),
        ("unknown", "none"),
    ] {
        let labels = [
            ("reporter", "destination"),
            ("source_principal", principal),
            ("connection_security_policy", security),
        ];
        assert_eq!(metric(n2, OPENED, &labels), 1, "{labels:?}");
    }

    let applied = Instant::now();
    let deadline = applied + Duration::from_secs(5);
    mesh.set_state(&with_deny).await?;
    let (hbone_victim, plain_victim) = blocking(move || {
        let hbone = closed_by(&mut hbone_victim, applied, deadline)
            .map_err(|e| anyhow::anyhow!("HBONE victim: {e}"))?;
        let plain = closed_by(&mut plain_victim, applied, deadline)
            .map_err(|e| anyhow::anyhow!("plaintext victim: {e}"))?;
        Ok((hbone, plain))
    })
    .await?;
    eprintln!(
        "closed after the DENY was applied: HBONE {hbone_victim:?}, plaintext {plain_victim:?}"
    );

    // The connection the DENY does not match keeps flowing.
    let kept = blocking(move || {
        anyhow::ensure!(ambit_tests::echo(&mut kept, b"after the deny")? == b"after the deny");
        Ok(kept)
    })
    .await?;
    // New connections meet the DENY at the door.
    refused(victim, dst).await?;

    // One line per closed connection, naming the policy and rule.
    let revoked = |ip: std::net::Ipv4Addr| {
        access_lines(
            &log,
            &[
                &format!("\"src.addr\":\"{ip}:"),
                TO_SRV,
                "\"outcome\":\"revoked\"",
            ],
        )
    };
    eventually("both revocations logged", || {
        revoked(victim.ip).len() == 1 && revoked(plain.ip).len() == 1
    })
    .await?;
    let line = &revoked(victim.ip)[0];
    assert_eq!(
        line["reason"],
        "policy changed: 403: denied by rv-srv/deny-later (rule 0)"
    );
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/rv-app/sa/victim"
    );
    assert_eq!(line["src.workload"], "rv-app/victim");
    assert_eq!(line["response_flags"], "RBAC");
    assert!(line["bytes_sent"].as_u64() >= Some(6), "{line}");
    let line = &revoked(plain.ip)[0];
    assert_eq!(
        line["reason"],
        "policy changed: 403: denied by rv-srv/deny-later (rule 1)"
    );
    assert_eq!(line["src.identity"], "unknown");
    assert_eq!(line["src.workload_by_ip"], "rv-legacy/plain");
    assert!(revoked(keeper.ip).is_empty());
    assert_eq!(
        metric(n2, "ambit_connections_revoked_total", &[]),
        2,
        "revocations counted"
    );

    // The kept connection ends normally, with its proven identity.
    drop(kept.shutdown(std::net::Shutdown::Both));
    drop(kept);
    let keeper_addr = format!("\"src.addr\":\"{}:", keeper.ip);
    eventually("the kept connection's line", || {
        access_lines(&log, &[&keeper_addr, TO_SRV, "\"outcome\":\"ok\""])
            .iter()
            .any(|l| l["src.identity"] == "spiffe://cluster.local/ns/rv-app/sa/keeper")
    })
    .await?;

    drop(app);
    mesh.shutdown().await;
    Ok(())
}

/// Writes `payload` on a plaintext connection ztunnel accepted and expects it closed
/// (end of stream or reset) without a byte back: the refusal as the client sees it.
fn closed_without_reply(pod: &Pod, dst: SocketAddr) -> anyhow::Result<()> {
    // The capture accepts the TCP connection locally (15006), so connecting succeeds.
    let mut s = ambit_tests::connect_from(pod, dst)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // The write may already meet the close (EPIPE / reset): that is a refusal too.
    let _ = std::io::Write::write_all(&mut s, b"secret payload\n");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => anyhow::bail!(
            "{dst} answered {:?}: not refused",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => anyhow::bail!("{dst}: neither closed nor answered: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_strict_namespace_refuses_plaintext_but_one_permissive_port_takes_it(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_peerauth")
        .node("n1")
        .node("n2")
        .pod("plain", "n1")
        .pod("good", "n1")
        .pod("web", "n2")
        .pod("db", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (plain, good, web, db) = (
        topo.pod("plain"),
        topo.pod("good"),
        topo.pod("web"),
        topo.pod("db"),
    );
    let workloads = format!(
        "workloads:\n{}{}{}    labels: {{app: web}}\n{}    labels: {{app: db}}\n",
        workload(plain, "pa-legacy", "default", "n1", false),
        workload(good, "pa-app", "good", "n1", true),
        workload(web, "pa-shop", "web", "n2", true),
        workload(db, "pa-shop", "db", "n2", true),
    );
    // STRICT for the namespace; web's 8080 (its target port) PERMISSIVE, its mode UNSET
    // (so its other ports inherit STRICT).
    let with_peer_auth = format!(
        "{workloads}\
peerAuthentications:
  - name: strict
    namespace: pa-shop
    mode: STRICT
  - name: web-8080
    namespace: pa-shop
    selector: {{app: web}}
    portLevelMtls: {{8080: PERMISSIVE}}
"
    );
    let log = access_log();
    // ztunnel's own default is PERMISSIVE: the policies alone make the difference.
    let mesh = Mesh::two_nodes(&topo, &workloads).await?;
    mesh.wait_enrolled("n1", &uid("pa-app", good), true).await?;
    mesh.wait_enrolled("n2", &uid("pa-shop", web), true).await?;
    mesh.wait_enrolled("n2", &uid("pa-shop", db), true).await?;
    let web_open = ReplyServer::start(web, 8080)?;
    let web_closed = ReplyServer::start(web, 9090)?;
    let db_app = ReplyServer::start(db, 8080)?;

    // Before any PeerAuthentication: plaintext reaches both, and stays open.
    let open = |pod: &Pod, dst: SocketAddr| {
        let pod = pod.clone();
        blocking(move || {
            let mut s = ambit_tests::connect_from(&pod, dst)?;
            ambit_tests::read_greeting(&mut s)?;
            anyhow::ensure!(ambit_tests::echo(&mut s, b"before")? == b"before");
            Ok(s)
        })
    };
    let mut to_db = open(plain, db_app.addr()).await?;
    let mut to_web = open(plain, web_open.addr()).await?;

    let applied = Instant::now();
    mesh.set_state(&with_peer_auth).await?;
    // The open plaintext connection to db (now STRICT) is closed; web's 8080 keeps flowing.
    let closed_after =
        blocking(move || closed_by(&mut to_db, applied, applied + Duration::from_secs(5))).await?;
    eprintln!("open plaintext to the STRICT port closed {closed_after:?} after the push");
    let to_web = blocking(move || {
        anyhow::ensure!(ambit_tests::echo(&mut to_web, b"after")? == b"after");
        Ok(to_web)
    })
    .await?;

    // New plaintext: refused on web's other port and on db, taken on web's 8080.
    let (seen_9090, seen_db) = (web_closed.seen().len(), db_app.seen().len());
    for dst in [web_closed.addr(), db_app.addr()] {
        let plain = plain.clone();
        blocking(move || closed_without_reply(&plain, dst)).await?;
    }
    assert_eq!(
        web_closed.seen().len(),
        seen_9090,
        "plaintext reached a STRICT port"
    );
    assert_eq!(
        db_app.seen().len(),
        seen_db,
        "plaintext reached a STRICT pod"
    );
    let seen = round_trip(plain, web_open.addr(), b"permissive port").await?;
    assert_eq!(seen.ip(), std::net::IpAddr::from(plain.ip));
    // mTLS is accepted in every mode: the enrolled client reaches the STRICT port.
    let seen = round_trip(good, web_closed.addr(), b"over hbone").await?;
    assert_eq!(seen.ip(), std::net::IpAddr::from(good.ip));

    // The access log names the PeerAuthentication and level that refused.
    let plain_addr = format!("\"src.addr\":\"{}:", plain.ip);
    let revoked = |dst: &str| access_lines(&log, &[&plain_addr, dst, "\"outcome\":\"revoked\""]);
    eventually("the revocation is logged", || {
        !revoked("\"dst.workload\":\"pa-shop/db\"").is_empty()
    })
    .await?;
    let line = &revoked("\"dst.workload\":\"pa-shop/db\"")[0];
    assert_eq!(
        line["reason"],
        "policy changed: 401: plaintext refused: mTLS STRICT by PeerAuthentication pa-shop/strict (namespace)"
    );
    assert_eq!(line["response_flags"], "RBAC");
    assert_eq!(line["src.identity"], "unknown");
    // The first refusal of a new connection on n2 is never throttled (a fresh ztunnel).
    let refused_line = access_lines(
        &log,
        &[
            &plain_addr,
            "\"dst.workload\":\"pa-shop/web\"",
            "plaintext refused",
        ],
    );
    assert_eq!(refused_line.len(), 1, "{refused_line:?}");
    assert_eq!(
        refused_line[0]["reason"],
        "401: plaintext refused: mTLS STRICT by PeerAuthentication pa-shop/strict (namespace)"
    );
    let n2 = mesh.app("n2");
    eventually("plaintext refusals counted as RBAC on n2", || {
        metric(
            n2,
            OPENED,
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
                ("response_flags", "RBAC"),
                ("destination_workload", "db"),
            ],
        ) >= 1
    })
    .await?;

    drop(to_web);
    drop((web_open, web_closed, db_app));
    mesh.shutdown().await;
    Ok(())
}
