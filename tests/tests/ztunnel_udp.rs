//! ztunnel end to end, UDP: two nodes, enrolled pods on each, the pods' UDP to the mesh
//! captured (`--udp-capture-cidrs`) and carried over CONNECT-UDP, with a sniffer on the
//! fabric. Needs root; see `ambit_tests::require_root`.
//!
//! - datagrams between two enrolled pods on different nodes cross the fabric only inside
//!   TLS on 15008; the server sees them in order (within the loss the test allows) from the
//!   client's own address, and its replies come back;
//! - a DENY AuthorizationPolicy on the client's identity stops its datagrams;
//! - a DNS exchange (hickory-proto messages) with a server in the destination pod on a
//!   non-53 port works through the mesh;
//! - each flow is counted (`istio_tcp_*{request_protocol="udp"}`) and logged once, with
//!   bytes and datagrams each way, when it goes idle;
//! - IPv6, with an IPv6 network listed: the same exchange between dual-stack pods over their
//!   IPv6 addresses (TLS only on the fabric, in order, from the client's IPv6 address, DENY
//!   stops it), DNS to port 53 still reaches the DNS proxy, a listed address outside the mesh
//!   is reached in passthrough, and IPv6 UDP to a network not listed is dropped in the
//!   client's pod (a victim outside the mesh sees nothing of it, while a pod outside the
//!   mesh reaches it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{in_netns, Pod, Topology};
use ambit_ztunnel::dns::DnsSettings;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

const ECHO_PORT: u16 = 7000;
const DNS_PORT: u16 = 5353;
const DATAGRAMS: usize = 50;
/// Loopback-speed netns links lose nothing in practice; the bound still says what UDP may do.
const MAX_LOSS: usize = 5;
/// The pods' flow cap in this test: above the flows the test opens on purpose, far below
/// the flood.
const FLOW_CAP: usize = 8;
const FLOOD: usize = 40;
/// The service VIP the DNS proxy answers for `echo.srv.svc.cluster.local`.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 1);
const ANSWER: Ipv4Addr = Ipv4Addr::new(10, 123, 45, 67);

/// What the server received: (source, payload), in order.
type Received = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP server in a pod: echoes `re:<payload>` on ECHO_PORT, answers A queries for any
/// name with ANSWER on DNS_PORT, and records (source, payload) of what it received.
struct UdpServer {
    seen: Received,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpServer {
    /// Listens on `ip` (the unspecified address of one family) in `pod`.
    fn start(pod: &Pod, ip: IpAddr) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for port in [ECHO_PORT, DNS_PORT] {
            let socket = in_netns(&pod.netns, move || UdpSocket::bind((ip, port)))??;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (seen, stop) = (seen.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let got = buf[..n].to_vec();
                    seen.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((from, got.clone()));
                    let reply = if port == ECHO_PORT {
                        Some([b"re:".as_slice(), &got].concat())
                    } else {
                        dns_answer(&got)
                    };
                    if let Some(reply) = reply {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            }));
        }
        Ok(UdpServer {
            seen,
            stop,
            threads,
        })
    }

    fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let q = query.queries.first()?.clone();
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.add_query(q.clone());
    if q.query_type() == RecordType::A {
        m.add_answer(Record::from_rdata(
            q.name().clone(),
            60,
            RData::A(A(ANSWER)),
        ));
    }
    m.to_vec().ok()
}

/// A UDP socket of `dst`'s family in `pod`, connected to `dst`, with a short read timeout.
fn pod_socket(pod: &Pod, dst: SocketAddr) -> anyhow::Result<UdpSocket> {
    let any: IpAddr = match dst {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = in_netns(&pod.netns, move || UdpSocket::bind((any, 0)))??;
    socket.connect(dst)?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(socket)
}

/// Sends DATAGRAMS numbered datagrams from `pod` to `dst`, a few milliseconds apart, and
/// returns the replies that came back.
async fn send_numbered(
    pod: &Pod,
    dst: SocketAddr,
    tag: &'static str,
) -> anyhow::Result<Vec<String>> {
    let pod = pod.clone();
    blocking(move || {
        let socket = pod_socket(&pod, dst)?;
        let mut replies = Vec::new();
        let mut buf = [0u8; 1500];
        for i in 0..DATAGRAMS {
            socket.send(format!("{tag}-{i:03}").as_bytes())?;
            // Paced like a chatty app, not a flood: the flow's queue is for bursts.
            std::thread::sleep(Duration::from_millis(5));
        }
        // The replies wait in the socket's buffer; the read timeout ends the wait.
        while let Ok(n) = socket.recv(&mut buf) {
            replies.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        Ok(replies)
    })
    .await
}

/// UDP datagrams (IPv4, or IPv6 without extension headers) on the fabric to or from `end`.
/// Only that address and port count: other pods' plain UDP (the checks' own control
/// traffic to pods outside the mesh) may be in flight while the sniffer runs.
fn udp_on_wire(frames: &[Vec<u8>], end: SocketAddr) -> usize {
    frames
        .iter()
        .filter(|f| {
            let Some(ip) = f.get(14..) else { return false };
            // Where the UDP header starts, and the source and destination addresses.
            let (udp, src, dst): (usize, Option<IpAddr>, Option<IpAddr>) = match f.get(12..14) {
                Some([0x08, 0x00]) if ip.get(9) == Some(&17) => {
                    let v4 = |at: usize| {
                        let b: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
                        Some(IpAddr::from(b))
                    };
                    (usize::from(ip[0] & 0x0f) * 4, v4(12), v4(16))
                }
                Some([0x86, 0xdd]) if ip.get(6) == Some(&17) => {
                    let v6 = |at: usize| {
                        let b: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                        Some(IpAddr::from(b))
                    };
                    (40, v6(8), v6(24))
                }
                _ => return false,
            };
            let port_at = |at: usize| {
                ip.get(udp + at..udp + at + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
            };
            let is_end = |addr: Option<IpAddr>, port: Option<u16>| {
                addr == Some(end.ip()) && port == Some(end.port())
            };
            is_end(src, port_at(0)) || is_end(dst, port_at(2))
        })
        .count()
}

/// The payloads `server` received from `from`, in order.
fn payloads_from(server: &UdpServer, from: IpAddr) -> Vec<String> {
    server
        .seen()
        .into_iter()
        .filter(|(src, _)| src.ip() == from)
        .map(|(_, p)| String::from_utf8_lossy(&p).into_owned())
        .collect()
}

/// Waits (up to 10 s) until `dst` echoes a datagram `pod` sends it.
async fn answers(pod: &Pod, dst: SocketAddr) -> anyhow::Result<()> {
    let pod = pod.clone();
    blocking(move || {
        let socket = pod_socket(&pod, dst)?;
        let mut buf = [0u8; 1500];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            // Errors (an unreachable path reported back) and timeouts mean "not yet".
            let _ = socket.send(b"PING");
            match socket.recv(&mut buf) {
                Ok(n) => {
                    anyhow::ensure!(&buf[..n] == b"re:PING", "{dst} answered {:?}", &buf[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(_) => {}
            }
        }
        anyhow::bail!("{dst} never answered {}", pod.name)
    })
    .await
}

/// Sends one A query for `name` from `pod` to `dns` and returns the addresses answered.
async fn resolve_a(
    pod: &Pod,
    dns: SocketAddr,
    name: &'static str,
) -> anyhow::Result<Vec<Ipv4Addr>> {
    let pod = pod.clone();
    let answer = blocking(move || {
        let socket = pod_socket(&pod, dns)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut m = Message::query();
        m.metadata.id = 5353;
        m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
        socket.send(&m.to_vec()?)?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        Ok(Message::from_vec(&buf[..n])?)
    })
    .await?;
    anyhow::ensure!(answer.metadata.id == 5353, "{answer:?}");
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_between_pods_is_carried_over_connect_udp_and_governed_by_policy() -> anyhow::Result<()>
{
    let Some(topo) = Topology::builder("zt_udp")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("bad", "n1")
        .pod("server", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, bad, server) = (topo.pod("client"), topo.pod("bad"), topo.pod("server"));
    let state = format!(
        "workloads:\n{}{}{}\
services:
  - name: echo
    namespace: srv
    vips: [{VIP}]
    ports: [{{port: 7000, targetPort: 7000}}]
policies:
  - name: deny-bad
    namespace: srv
    action: DENY
    rules:
      - from: [{{principals: [\"cluster.local/ns/bad/sa/bad\"]}}]
",
        workload(client, "app", "client", "n1", true),
        workload(bad, "bad", "bad", "n1", true),
        workload(server, "srv", "server", "n2", true),
    );
    let log = access_log();
    let capture: Vec<ipnet::IpNet> = vec![format!("{}/32", server.ip).parse()?];
    let mesh = Mesh::start(
        &topo,
        &["n1", "n2"],
        &state,
        TestCa::new(Duration::from_secs(3600)),
        |_, config| {
            config.rules.udp_capture = capture.clone();
            // Flows end (and are logged) soon after the test stops sending.
            config.limits.udp_idle_timeout = Duration::from_secs(2);
            config.limits.pod_udp_flows = FLOW_CAP;
            // The DNS proxy on, to show that port 53 still reaches it under UDP capture.
            config.dns = DnsSettings::default();
        },
    )
    .await?;
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    mesh.wait_enrolled("n1", &uid("bad", bad), true).await?;
    mesh.wait_enrolled("n2", &uid("srv", server), true).await?;
    let rules = ambit_tests::exec_in(&client.netns, &["iptables-save"])?;
    assert!(
        rules.contains("--on-port 15001 --on-ip 127.0.0.1"),
        "UDP not captured:\n{rules}"
    );
    let srv = UdpServer::start(server, Ipv4Addr::UNSPECIFIED.into())?;
    let echo = SocketAddr::new(server.ip.into(), ECHO_PORT);

    // Across nodes, with the fabric watched.
    let fabric = topo.namespaces()[0].clone();
    let sniffer = Sniffer::start(&fabric)?;
    let replies = send_numbered(client, echo, "UDP-SECRET").await?;
    let frames = sniffer.frames();
    let wire = sniffer.bytes();
    drop(sniffer);

    let from_client = payloads_from(&srv, client.ip.into());
    assert!(
        from_client.len() + MAX_LOSS >= DATAGRAMS,
        "the server got {} of {DATAGRAMS} datagrams from the client's address: {:?}",
        from_client.len(),
        srv.seen()
    );
    let mut sorted = from_client.clone();
    sorted.sort();
    assert_eq!(from_client, sorted, "datagrams arrived out of order");
    assert!(
        replies.len() + MAX_LOSS >= DATAGRAMS,
        "{} replies came back: {replies:?}",
        replies.len()
    );
    assert!(
        replies.iter().all(|r| r.starts_with("re:UDP-SECRET-")),
        "{replies:?}"
    );
    assert!(contains(&wire, &[0x16, 0x03]), "no TLS on the fabric");
    assert!(
        !contains(&wire, b"UDP-SECRET"),
        "datagram payload crossed the fabric in plaintext"
    );
    assert_eq!(
        udp_on_wire(&frames, echo),
        0,
        "UDP to the server's port crossed the fabric"
    );

    // A DNS exchange through the mesh, with a server in the destination pod.
    let dns = SocketAddr::new(server.ip.into(), DNS_PORT);
    let answer = {
        let client = client.clone();
        blocking(move || {
            let socket = pod_socket(&client, dns)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut m = Message::query();
            m.metadata.id = 4242;
            m.add_query(Query::query(Name::from_ascii("echo.test.")?, RecordType::A));
            socket.send(&m.to_vec()?)?;
            let mut buf = [0u8; 1500];
            let n = socket.recv(&mut buf)?;
            Ok(Message::from_vec(&buf[..n])?)
        })
        .await?
    };
    assert_eq!(answer.metadata.id, 4242);
    let addrs: Vec<_> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(addrs, [ANSWER]);

    // DNS to port 53 of a captured address is the DNS proxy's, not a UDP flow (nothing
    // listens on the server's port 53): ztunnel answers the service's VIP.
    let port53 = SocketAddr::new(server.ip.into(), 53);
    let addrs = resolve_a(client, port53, "echo.srv.svc.cluster.local.").await?;
    assert_eq!(addrs, [VIP]);

    // DENY by the client's identity: nothing reaches the server, nothing comes back.
    let before = srv.seen().len();
    let replies = send_numbered(bad, echo, "BAD").await?;
    assert!(replies.is_empty(), "denied flow got replies: {replies:?}");
    assert!(
        !srv.seen()
            .iter()
            .any(|(from, _)| from.ip() == IpAddr::from(bad.ip)),
        "a denied pod's datagram reached the server"
    );
    assert_eq!(srv.seen().len(), before);

    // Metrics and one access-log line per flow (after its idle timeout).
    let flow = [
        "\"protocol\":\"connect-udp\"",
        "\"direction\":\"outbound\"",
        &format!("\"dst.addr\":\"{echo}\""),
        &format!("\"src.addr\":\"{}:", client.ip),
    ];
    eventually("the client's UDP flow's access-log line", || {
        !access_lines(&log, &flow).is_empty()
    })
    .await?;
    let lines = access_lines(&log, &flow);
    assert_eq!(lines.len(), 1, "one line per flow: {lines:?}");
    let line = &lines[0];
    let sent = line["datagrams_sent"].as_u64().unwrap_or_default();
    assert_eq!(sent, DATAGRAMS as u64, "{line}");
    assert!(line["datagrams_received"].as_u64().unwrap_or_default() + MAX_LOSS as u64 >= sent);
    assert_eq!(line["outcome"], "ok", "{line}");
    let inbound = [
        "\"protocol\":\"connect-udp\"",
        "\"direction\":\"inbound\"",
        "\"outcome\":\"ok\"",
        &format!("\"dst.addr\":\"{echo}\""),
    ];
    eventually("the server side's access-log line", || {
        !access_lines(&log, &inbound).is_empty()
    })
    .await?;
    let line = &access_lines(&log, &inbound)[0];
    assert_eq!(
        line["src.identity"], "spiffe://cluster.local/ns/app/sa/client",
        "{line}"
    );
    assert_eq!(line["datagrams_received"], DATAGRAMS as u64, "{line}");
    // The denied flow's refusal, on the server's side, names the policy.
    let refused = [
        "\"direction\":\"inbound\"",
        "\"src.identity\":\"spiffe://cluster.local/ns/bad/sa/bad\"",
    ];
    let line = &access_lines(&log, &refused)[0];
    assert_eq!(
        line["reason"], "403: denied by srv/deny-bad (rule 0)",
        "{line}"
    );
    let denied = [
        "\"direction\":\"outbound\"",
        "\"response_flags\":\"RBAC\"",
        &format!("\"src.addr\":\"{}:", bad.ip),
    ];
    let denied_lines = access_lines(&log, &denied);
    assert_eq!(
        denied_lines.len(),
        1,
        "one refusal per denied flow: {denied_lines:?}"
    );
    let udp = [("request_protocol", "udp")];
    let opened = |node: &str, reporter: &str| {
        metric(
            mesh.app(node),
            "istio_tcp_connections_opened_total",
            &[
                udp[0],
                ("reporter", reporter),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    assert!(opened("n1", "source") >= 2, "n1 counted no UDP flows");
    assert!(opened("n2", "destination") >= 2, "n2 counted no UDP flows");
    let received = metric(
        mesh.app("n2"),
        "istio_tcp_received_bytes_total",
        &[udp[0], ("reporter", "destination")],
    );
    assert!(
        received >= ((DATAGRAMS - MAX_LOSS) * "UDP-SECRET-000".len()) as u64,
        "n2 counted {received} bytes"
    );

    // A flood of flows (a new source port per datagram) is held to the pod's cap: the
    // datagrams past it are dropped and counted, and once the flood's flows go idle the pod
    // opens flows again.
    let before: std::collections::HashSet<SocketAddr> =
        srv.seen().iter().map(|(f, _)| *f).collect();
    {
        let client = client.clone();
        blocking(move || {
            for i in 0..FLOOD {
                let socket = pod_socket(&client, echo)?;
                socket.send(format!("FLOOD-{i:03}").as_bytes())?;
            }
            Ok(())
        })
        .await?;
    }
    let refused = || {
        metric(
            mesh.app("n1"),
            "ambit_ztunnel_connections_refused_total",
            &[("reason", "pod_udp_flows")],
        )
    };
    eventually("flows over the cap refused", || {
        refused() as usize >= FLOOD - FLOW_CAP
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flood_flows = srv
        .seen()
        .iter()
        .filter(|(from, p)| p.starts_with(b"FLOOD") && !before.contains(from))
        .count();
    assert!(
        flood_flows <= FLOW_CAP,
        "{flood_flows} flood flows reached the server past a cap of {FLOW_CAP}"
    );
    assert!(flood_flows >= 1, "no flood flow got through at all");
    // The flood's flows idle out (2 s); a new flow is served again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let replies = send_numbered(client, echo, "AFTER").await?;
    assert!(
        replies.len() + MAX_LOSS >= DATAGRAMS,
        "after the flood: {} replies",
        replies.len()
    );

    drop(srv);
    mesh.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_udp_is_carried_to_listed_networks_and_dropped_to_others() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_udp6")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("bad", "n1")
        .pod("plain", "n1")
        .pod("server", "n2")
        .pod("victim", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, bad, plain) = (topo.pod("client"), topo.pod("bad"), topo.pod("plain"));
    let (server, victim) = (topo.pod("server"), topo.pod("victim"));
    let state = format!(
        "workloads:\n{}{}{}{}{}\
services:
  - name: echo
    namespace: srv
    vips: [{VIP}]
    ports: [{{port: 7000, targetPort: 7000}}]
policies:
  - name: deny-bad
    namespace: srv
    action: DENY
    rules:
      - from: [{{principals: [\"cluster.local/ns/bad/sa/bad\"]}}]
",
        dual_stack(client, "app", "client", "n1", true),
        dual_stack(bad, "bad", "bad", "n1", true),
        dual_stack(plain, "legacy", "default", "n1", false),
        dual_stack(server, "srv", "server", "n2", true),
        // Outside the mesh, and outside the listed network: only the client's own rules
        // stand between it and the client's datagrams.
        dual_stack(victim, "legacy", "default", "n2", false),
    );
    let log = access_log();
    // IPv6 addresses only (the server's, and that of a pod outside the mesh), so IPv4 UDP is
    // left alone.
    let capture: Vec<ipnet::IpNet> = vec![
        format!("{}/128", server.ip6).parse()?,
        format!("{}/128", plain.ip6).parse()?,
    ];
    let mesh = Mesh::start(
        &topo,
        &["n1", "n2"],
        &state,
        TestCa::new(Duration::from_secs(3600)),
        |node, config| {
            config.rules.udp_capture = capture.clone();
            config.limits.udp_idle_timeout = Duration::from_secs(2);
            // The DNS proxy on node 2 only: on node 1 the filter then lets out no marked
            // UDP but to the listed networks, which the passthrough below needs.
            if node == "n2" {
                config.dns = DnsSettings::default();
            }
        },
    )
    .await?;
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    mesh.wait_enrolled("n1", &uid("bad", bad), true).await?;
    mesh.wait_enrolled("n2", &uid("srv", server), true).await?;
    let rules6 = ambit_tests::exec_in(&client.netns, &["ip6tables-save"])?;
    assert!(
        rules6.contains("--on-port 15001 --on-ip ::1"),
        "IPv6 UDP not captured:\n{rules6}"
    );
    let rules4 = ambit_tests::exec_in(&client.netns, &["iptables-save"])?;
    assert!(
        !rules4.contains("--on-port 15001 --on-ip"),
        "IPv4 UDP captured without an IPv4 network listed:\n{rules4}"
    );
    let srv = UdpServer::start(server, Ipv6Addr::UNSPECIFIED.into())?;
    let echo = SocketAddr::new(server.ip6.into(), ECHO_PORT);
    // The victim answers a pod outside the mesh: the path to it is open, so the check below
    // that the client cannot reach it proves something. Waited for: the fabric's IPv6
    // carries nothing for about two seconds after the topology is made (its neighbours).
    let sink = UdpServer::start(victim, Ipv6Addr::UNSPECIFIED.into())?;
    let target = SocketAddr::new(victim.ip6.into(), ECHO_PORT);
    answers(plain, target).await?;

    let fabric = topo.namespaces()[0].clone();
    let sniffer = Sniffer::start(&fabric)?;
    let replies = send_numbered(client, echo, "UDP6-SECRET").await?;
    let frames = sniffer.frames();
    let wire = sniffer.bytes();
    drop(sniffer);
    let from_client = payloads_from(&srv, client.ip6.into());
    assert!(
        from_client.len() + MAX_LOSS >= DATAGRAMS,
        "the server got {} of {DATAGRAMS} datagrams from the client's IPv6 address: {:?}",
        from_client.len(),
        srv.seen()
    );
    let mut sorted = from_client.clone();
    sorted.sort();
    assert_eq!(from_client, sorted, "datagrams arrived out of order");
    assert!(
        replies.len() + MAX_LOSS >= DATAGRAMS
            && replies.iter().all(|r| r.starts_with("re:UDP6-SECRET-")),
        "{} replies came back: {replies:?}",
        replies.len()
    );
    assert!(contains(&wire, &[0x16, 0x03]), "no TLS on the fabric");
    assert!(
        !contains(&wire, b"UDP6-SECRET"),
        "datagram payload crossed the fabric in plaintext"
    );
    assert_eq!(
        udp_on_wire(&frames, echo),
        0,
        "UDP to the server's port crossed the fabric"
    );

    // Port 53 over IPv6 is still the DNS proxy's, also to a listed address.
    let port53 = SocketAddr::new(plain.ip6.into(), 53);
    assert_eq!(
        resolve_a(server, port53, "echo.srv.svc.cluster.local.").await?,
        [VIP]
    );

    // DENY by the client's identity: nothing reaches the server, nothing comes back.
    let before = srv.seen().len();
    let replies = send_numbered(bad, echo, "BAD6").await?;
    assert!(replies.is_empty(), "denied flow got replies: {replies:?}");
    assert!(
        payloads_from(&srv, bad.ip6.into()).is_empty(),
        "a denied pod's datagram reached the server"
    );
    assert_eq!(srv.seen().len(), before);

    // A listed address outside the mesh: the flow passes through in plaintext from a socket
    // ztunnel marks in the client's pod (the filter lets those out to the listed networks
    // only), from the client's address, and the answers come back.
    let outside = UdpServer::start(plain, Ipv6Addr::UNSPECIFIED.into())?;
    let passthrough = SocketAddr::new(plain.ip6.into(), ECHO_PORT);
    let replies = send_numbered(client, passthrough, "PASS6").await?;
    assert!(
        replies.len() + MAX_LOSS >= DATAGRAMS && replies.iter().all(|r| r.starts_with("re:PASS6-")),
        "{} passthrough replies came back: {replies:?}",
        replies.len()
    );
    assert!(payloads_from(&outside, client.ip6.into()).len() + MAX_LOSS >= DATAGRAMS);

    // A network not listed: the client's datagrams to the victim die in the client's pod
    // (the fabric carries none).
    let sniffer = Sniffer::start(&fabric)?;
    {
        let client = client.clone();
        blocking(move || {
            let socket = pod_socket(&client, target)?;
            for i in 0..5 {
                // Refused locally (ICMPv6 administratively prohibited): an error is the
                // expected outcome, not a failure.
                let _ = socket.send(format!("LEAK6-{i}").as_bytes());
            }
            Ok(())
        })
        .await?;
    }
    // Sent after the client's: had those been let out, the sniffer would have them once it
    // has these. Seeing these also shows the checks below had eyes.
    answers(plain, target).await?;
    eventually("the sniffer to see plain UDP to the victim", || {
        udp_on_wire(&sniffer.frames(), target) > 0
    })
    .await?;
    let frames = sniffer.frames();
    drop(sniffer);
    assert!(
        payloads_from(&sink, client.ip6.into()).is_empty(),
        "the victim got the client's IPv6 UDP: {:?}",
        sink.seen()
    );
    assert!(
        !contains(&frames.concat(), b"LEAK6"),
        "the client's IPv6 UDP to a network not listed crossed the fabric"
    );

    // The flow was carried over CONNECT-UDP to the server's IPv6 address, and counted.
    let flow = [
        "\"protocol\":\"connect-udp\"",
        "\"direction\":\"inbound\"",
        "\"outcome\":\"ok\"",
        &format!("\"dst.addr\":\"{echo}\""),
    ];
    eventually("the server side's access-log line", || {
        !access_lines(&log, &flow).is_empty()
    })
    .await?;
    let line = &access_lines(&log, &flow)[0];
    assert_eq!(
        line["src.identity"], "spiffe://cluster.local/ns/app/sa/client",
        "{line}"
    );
    assert!(
        line["src.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("[{}]:", client.ip6))),
        "{line}"
    );
    let opened = metric(
        mesh.app("n2"),
        "istio_tcp_connections_opened_total",
        &[("request_protocol", "udp"), ("reporter", "destination")],
    );
    assert!(opened >= 1, "n2 counted no UDP flows");

    drop((srv, sink, outside));
    mesh.shutdown().await;
    Ok(())
}
