//! ztunnel end to end, IPv6: every pod of the topology is dual-stack. Written as the attack of
//! a dual-stack pod trying IPv6 past the mesh, with a sniffer on the fabric:
//!
//! - an enrolled pod the mesh knows by both addresses talks IPv6 to a meshed pod on another
//!   node: it goes through the mesh (HBONE to the server's IPv6 address on 15008), the fabric
//!   sees only TLS on 15008, the server's ztunnel names the client by its proven identity, and
//!   a DENY with an IPv6 ipBlock stops it (IPv4 from the same pod still flows);
//! - IPv6 that cannot be meshed is dropped, never let through: UDP from an enrolled pod, TCP to
//!   an IPv6 address the mesh does not know, and all IPv6 of an enrolled pod the mesh knows by
//!   its IPv4 address only.
//!
//! Needs root; see `ambit_tests::require_root`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{in_netns, Pod, ReplyServer, Topology};

/// Connect timeout of attempts that must fail: refused ones fail at once, dropped ones after
/// this, which keeps the test cheap.
const SHORT: Duration = Duration::from_secs(1);

/// Tries a TCP connection from `pod` to `dst`; `Ok` is a connection that was let through.
async fn try_connect(pod: &Pod, dst: SocketAddr) -> anyhow::Result<std::io::Result<TcpStream>> {
    let netns = pod.netns.clone();
    blocking(move || in_netns(&netns, move || TcpStream::connect_timeout(&dst, SHORT))).await
}

/// Connects from `pod` to `dst` through the capture, which accepts locally, and expects the
/// connection to be closed without the server's greeting.
async fn refused(pod: &Pod, dst: SocketAddr, payload: &[u8]) -> anyhow::Result<()> {
    let (pod, payload) = (pod.clone(), payload.to_vec());
    blocking(move || {
        let Ok(mut s) = ambit_tests::connect_from(&pod, dst) else {
            return Ok(());
        };
        // Whatever the app sends first must not cross either.
        let _ = std::io::Write::write_all(&mut s, &payload);
        match ambit_tests::read_greeting(&mut s) {
            Ok(seen) => anyhow::bail!("{dst} answered {seen:?}: not refused"),
            Err(_) => Ok(()),
        }
    })
    .await
}

/// Sends one UDP datagram from `pod` to `dst`; the result of `send_to` is returned, not judged
/// (a refused send may fail locally or silently: either way only the wire tells).
async fn send_udp(pod: &Pod, dst: SocketAddr, payload: &[u8]) -> anyhow::Result<()> {
    let (netns, payload) = (pod.netns.clone(), payload.to_vec());
    blocking(move || {
        in_netns(&netns, move || -> std::io::Result<()> {
            let socket = UdpSocket::bind("[::]:0")?;
            socket.send_to(&payload, dst).map(drop)
        })
        .map(|sent| {
            if let Err(err) = sent {
                eprintln!("udp send to {dst}: {err}");
            }
        })
    })
    .await
}

/// An IPv6 TCP segment seen on the fabric.
#[derive(Debug)]
struct Segment {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

impl Segment {
    /// Reads an Ethernet frame carrying IPv6 and TCP (no extension headers: the stack sends
    /// none for TCP); anything else is `None`.
    fn parse(frame: &[u8]) -> Option<Segment> {
        let ip = frame.get(14..)?;
        if frame.get(12..14)? != [0x86, 0xdd] || *ip.get(6)? != 6 {
            return None;
        }
        let addr = |at: usize| -> Option<Ipv6Addr> {
            let b: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
            Some(Ipv6Addr::from(b))
        };
        let payload_len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
        let tcp = ip.get(40..40 + payload_len)?;
        let port = |at: usize| Some(u16::from_be_bytes([*tcp.get(at)?, *tcp.get(at + 1)?]));
        let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
        Some(Segment {
            src: SocketAddr::new(addr(8)?.into(), port(0)?),
            dst: SocketAddr::new(addr(24)?.into(), port(2)?),
            payload: tcp.get(data_offset..)?.to_vec(),
        })
    }

    fn between(&self, a: IpAddr, b: IpAddr) -> bool {
        let (s, d) = (self.src.ip(), self.dst.ip());
        (s == a && d == b) || (s == b && d == a)
    }

    fn has_port(&self, port: u16) -> bool {
        self.src.port() == port || self.dst.port() == port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_talk_ipv6_through_the_mesh_and_the_fabric_sees_only_tls(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_ipv6_mesh")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("server", "n2")
        .pod("plain-s", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, server, plain_s) = (topo.pod("client"), topo.pod("server"), topo.pod("plain-s"));
    let server4 = ReplyServer::start(server, 8080)?;
    let server6 = ReplyServer::start_v6(server, 8081)?;
    let plain6 = ReplyServer::start_v6(plain_s, 8081)?;
    let udp_sink = SocketAddr::new(plain_s.ip6.into(), 9999);

    let workloads = format!(
        "workloads:\n{}{}{}",
        dual_stack(client, "app", "client", "n1", true),
        dual_stack(server, "srv", "server", "n2", true),
        dual_stack(plain_s, "legacy", "default", "n2", false),
    );
    let log = access_log();
    let mesh = Mesh::two_nodes(&topo, &workloads).await?;
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    mesh.wait_enrolled("n2", &uid("srv", server), true).await?;
    for pod in [client, server] {
        let rules = ambit_tests::exec_in(&pod.netns, &["ip6tables-save"])?;
        for rule in [
            "-A OUTPUT -j AMBIT_OUTPUT",
            "-j REDIRECT --to-ports 15001",
            "-j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x111/0xfff",
            "-A AMBIT_INPUT -j DROP",
        ] {
            assert!(
                rules.contains(rule),
                "{}: IPv6 not captured ({rule}):\n{rules}",
                pod.name
            );
        }
        let routes = ambit_tests::exec_in(&pod.netns, &["ip", "-6", "rule", "show"])?;
        assert!(routes.contains("fwmark 0x111/0xfff lookup 133"), "{routes}");
    }

    // The self-dial over IPv6: ztunnel's own listeners in the pod, on the IPv6 loopback and
    // the pod's IPv6 address, are refused at once (the outbound one counted as a self-dial),
    // never dialled again.
    for dst in [
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 15001),
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 15006),
        SocketAddr::new(client.ip6.into(), 15006),
    ] {
        refused(client, dst, b"x").await?;
    }
    let self_dials = metric(
        mesh.app("n1"),
        "ambit_ztunnel_connections_refused_total",
        &[("reason", "self_dial")],
    );
    assert_eq!(self_dials, 1, "[::1]:15001 not refused as a self-dial");

    let fabric = topo.namespaces()[0].clone();
    let sniffer = Sniffer::start(&fabric)?;

    // IPv6 between two meshed pods on two nodes: through the mesh, from the client's own
    // IPv6 address as the server's app sees it.
    let v6_secret = b"SECRET-V6-TCP-0123456789";
    let seen = round_trip(client, server6.addr(), v6_secret).await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip6));
    let v4_secret = b"SECRET-V4-TCP-0123456789";
    round_trip(client, server4.addr(), v4_secret).await?;

    // The server's ztunnel names the IPv6 client by the identity its certificate proved.
    let from_client = format!("\"src.addr\":\"[{}]:", client.ip6);
    eventually("the server's inbound IPv6 access-log line", || {
        !access_lines(&log, &[&from_client, "\"direction\":\"inbound\""]).is_empty()
    })
    .await?;
    let line = &access_lines(&log, &[&from_client, "\"direction\":\"inbound\""])[0];
    assert_eq!(
        line["src.identity"], "spiffe://cluster.local/ns/app/sa/client",
        "{line}"
    );
    assert_eq!(
        line["dst.addr"],
        server6.addr().to_string(),
        "the CONNECT authority is [addr]:port: {line}"
    );

    // What cannot be meshed is not let out: UDP, and an IPv6 address the mesh does not know
    // (the mesh's own fabric address of node 2 stands in for any such address).
    let udp_secret = b"SECRET-V6-UDP-FROM-ENROLLED";
    send_udp(client, udp_sink, udp_secret).await?;
    let unknown = SocketAddr::new(topo.node("n2").ip6.into(), 8081);
    let unknown_secret = b"SECRET-V6-TO-UNKNOWN-ADDRESS";
    refused(client, unknown, unknown_secret).await?;
    // A pod outside the mesh the mesh knows by its IPv6 address is reached as with IPv4:
    // in plaintext, on purpose (it cannot speak HBONE).
    let seen = round_trip(client, plain6.addr(), b"to-legacy").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip6));

    let control = b"CONTROL-V6-UDP-FROM-PLAIN";
    send_udp(plain_s, SocketAddr::new(client.ip6.into(), 9999), control).await?;
    eventually("the sniffer to see the control datagram", || {
        contains(&sniffer.bytes(), control)
    })
    .await?;
    let wire = sniffer.bytes();
    let frames = sniffer.frames();
    drop(sniffer);
    for secret in [&v6_secret[..], v4_secret, udp_secret, unknown_secret] {
        assert!(
            !contains(&wire, secret),
            "{} crossed the fabric in plaintext",
            String::from_utf8_lossy(secret)
        );
    }
    let (c6, s6) = (IpAddr::from(client.ip6), server6.addr().ip());
    let segments: Vec<Segment> = frames.iter().filter_map(|f| Segment::parse(f)).collect();
    let between: Vec<&Segment> = segments.iter().filter(|s| s.between(c6, s6)).collect();
    assert!(
        !between.is_empty(),
        "no IPv6 between the pods on the fabric"
    );
    let off_port: Vec<&&Segment> = between.iter().filter(|s| !s.has_port(15008)).collect();
    assert!(
        off_port.is_empty(),
        "IPv6 between the meshed pods outside HBONE: {off_port:?}"
    );
    assert!(
        between
            .iter()
            .any(|s| s.dst.port() == 15008 && s.payload.starts_with(&[0x16, 0x03])),
        "no TLS handshake to the server's IPv6 address on 15008"
    );
    assert!(
        !segments
            .iter()
            .any(|s| s.has_port(8081) && s.between(c6, s6)),
        "the app port over IPv6 on the fabric"
    );

    // A DENY with an IPv6 ipBlock (the client's node's pod /64) stops IPv6 from the client;
    // the app never sees it. The same client's IPv4 is outside the block and still flows.
    let [a, b, c, d, ..] = client.ip6.segments();
    let with_deny = format!(
        "{workloads}\
policies:
  - name: deny-node1-v6
    namespace: srv
    action: DENY
    rules:
      - from: [{{ipBlocks: [\"{a:x}:{b:x}:{c:x}:{d:x}::/64\"]}}]
"
    );
    mesh.set_state(&with_deny).await?;
    let accepted = server6.seen().len();
    refused(client, server6.addr(), b"denied").await?;
    assert_eq!(
        server6.seen().len(),
        accepted,
        "a denied IPv6 connection reached the app"
    );
    eventually("the IPv6 denial in the server's access log", || {
        access_lines(&log, &[&from_client, "deny-node1-v6"])
            .iter()
            .any(|l| l["response_flags"] == "RBAC")
    })
    .await?;
    round_trip(client, server4.addr(), b"v4 still flows").await?;

    drop((server4, server6, plain6));
    mesh.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_the_mesh_cannot_carry_is_dropped_and_never_crosses_the_fabric() -> anyhow::Result<()>
{
    let Some(topo) = Topology::builder("zt_ipv6_closed")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("plain-c", "n1")
        .pod("server", "n2")
        .pod("plain-s", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let (plain_c, plain_s) = (topo.pod("plain-c"), topo.pod("plain-s"));
    let server4 = ReplyServer::start(server, 8080)?;
    let server6 = ReplyServer::start_v6(server, 8081)?;
    let plain6 = ReplyServer::start_v6(plain_s, 8081)?;
    let udp_sink = SocketAddr::new(plain_s.ip6.into(), 9999);

    // Before enrollment the pods' IPv6 works: what follows can only pass because of capture.
    let seen = round_trip(client, server6.addr(), b"before").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip6));

    // The mesh knows the enrolled pods by their IPv4 address only (a single-stack cluster
    // whose nodes have IPv6 anyway): their IPv6 cannot be meshed.
    let state = format!(
        "workloads:\n{}{}{}{}",
        workload(client, "app", "client", "n1", true),
        workload(server, "app", "server", "n2", true),
        workload(plain_c, "legacy", "default", "n1", false),
        workload(plain_s, "legacy", "default", "n2", false),
    );
    let mesh = Mesh::two_nodes(&topo, &state).await?;
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    mesh.wait_enrolled("n2", &uid("app", server), true).await?;
    let accepted_before = server6.seen().len();
    for pod in [client, server] {
        let rules = ambit_tests::exec_in(&pod.netns, &["ip6tables-save"])?;
        assert!(
            rules.contains("-A OUTPUT -j AMBIT_OUTPUT")
                && rules.contains("-A INPUT -j AMBIT_INPUT")
                && rules.contains("-A AMBIT_INPUT -j DROP"),
            "{}: IPv6 not closed:\n{rules}",
            pod.name
        );
        assert!(
            !rules.contains("TPROXY")
                && !rules.contains("REDIRECT")
                && !rules.contains("-p tcp -j RETURN"),
            "{}: IPv6 captured although the mesh does not know it:\n{rules}",
            pod.name
        );
    }

    let fabric = topo.namespaces()[0].clone();
    let sniffer = Sniffer::start(&fabric)?;

    // IPv4 is meshed as usual (and the sniffer is live).
    let v4_secret = b"SECRET-V4-0123456789";
    round_trip(client, server4.addr(), v4_secret).await?;

    // The enrolled client's IPv6: to a meshed pod, to a pod outside the mesh, and UDP.
    let to_meshed = try_connect(client, server6.addr()).await?;
    assert!(
        to_meshed.is_err(),
        "IPv6 TCP from an enrolled pod to a meshed pod was let through"
    );
    let to_plain = try_connect(client, plain6.addr()).await?;
    assert!(
        to_plain.is_err(),
        "IPv6 TCP from an enrolled pod to a pod outside the mesh was let through"
    );
    let udp_secret = b"SECRET-V6-UDP-FROM-ENROLLED";
    send_udp(client, udp_sink, udp_secret).await?;

    // A pod outside the mesh reaching the enrolled server over IPv6: dropped before the app.
    let inbound = try_connect(plain_c, server6.addr()).await?;
    assert!(
        inbound.is_err(),
        "IPv6 from outside the mesh reached an enrolled pod's app"
    );

    // The control: the same datagram between two pods outside the mesh crosses in the clear,
    // so the sniffer would have seen the enrolled pod's one had it left the pod.
    let control = b"CONTROL-V6-UDP-FROM-PLAIN";
    send_udp(plain_c, udp_sink, control).await?;
    eventually("the sniffer to see the control datagram", || {
        contains(&sniffer.bytes(), control)
    })
    .await?;
    let wire = sniffer.bytes();
    let frames = sniffer.frames();
    drop(sniffer);
    assert!(
        contains(&wire, &[0x16, 0x03]),
        "no TLS on the fabric for IPv4"
    );
    assert!(!contains(&wire, v4_secret), "IPv4 payload in plaintext");
    assert!(
        !contains(&wire, udp_secret),
        "the enrolled pod's IPv6 datagram crossed the fabric"
    );
    let c6 = IpAddr::from(client.ip6);
    let leaked: Vec<Segment> = frames
        .iter()
        .filter_map(|f| Segment::parse(f))
        .filter(|s| s.src.ip() == c6 || s.dst.ip() == c6)
        .collect();
    assert!(
        leaked.is_empty(),
        "the enrolled client's IPv6 TCP on the fabric: {leaked:?}"
    );
    assert_eq!(
        server6.seen().len(),
        accepted_before,
        "the enrolled server's app accepted IPv6 connections: {:?}",
        server6.seen()
    );
    assert!(
        plain6.seen().is_empty(),
        "the pod outside the mesh accepted IPv6 from the enrolled pod: {:?}",
        plain6.seen()
    );

    // Once the mesh learns the pods' IPv6 addresses, their IPv6 is captured instead of closed
    // (the pods are re-captured), and IPv6 between them flows through the mesh.
    let dual = state.replace(
        &format!("addresses: [{}]", client.ip),
        &format!("addresses: [{}, '{}']", client.ip, client.ip6),
    );
    let dual = dual.replace(
        &format!("addresses: [{}]", server.ip),
        &format!("addresses: [{}, '{}']", server.ip, server.ip6),
    );
    mesh.set_state(&dual).await?;
    let captured = |pod: &Pod| -> anyhow::Result<bool> {
        Ok(ambit_tests::exec_in(&pod.netns, &["ip6tables-save"])?.contains("TPROXY"))
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !(captured(client)? && captured(server)?) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "IPv6 not captured after the mesh learnt the addresses"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    mesh.wait_enrolled("n2", &uid("app", server), true).await?;
    let seen = eventually_round_trip(client, server6.addr()).await?;
    assert_eq!(seen.ip(), c6);

    // Un-enrolling removes the IPv6 rules with the IPv4 ones: IPv6 works again, directly.
    let unenrolled = dual.replace("protocol: HBONE", "protocol: TCP");
    mesh.set_state(&unenrolled).await?;
    mesh.wait_enrolled("n1", &uid("app", client), false).await?;
    mesh.wait_enrolled("n2", &uid("app", server), false).await?;
    for pod in [client, server] {
        let rules = ambit_tests::exec_in(&pod.netns, &["ip6tables-save"])?;
        assert!(!rules.contains("AMBIT"), "IPv6 rules left behind:\n{rules}");
        let routes = ambit_tests::exec_in(&pod.netns, &["ip", "-6", "rule", "show"])?;
        assert!(
            !routes.contains("fwmark"),
            "IPv6 policy rule left behind:\n{routes}"
        );
    }
    let seen = round_trip(client, server6.addr(), b"after").await?;
    assert_eq!(seen.ip(), c6);

    drop((server4, server6, plain6));
    mesh.shutdown().await;
    Ok(())
}

/// A round trip that may first meet a pod still being re-captured (its listeners just
/// opened): retried for at most [`WAIT`].
async fn eventually_round_trip(pod: &Pod, dst: SocketAddr) -> anyhow::Result<SocketAddr> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match round_trip(pod, dst, b"once captured").await {
            Ok(seen) => return Ok(seen),
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("round trip to {dst}: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
