//! ztunnel end to end, DNS: enrolled pods' DNS (UDP and TCP to port 53) is captured into
//! ztunnel's DNS proxy (15053 in the pod), which answers the mesh's service names with their
//! VIPs and forwards everything else to the pod's resolver, a real DNS server in another
//! namespace. The pods resolve with the C library's resolver (`getent`), through the search
//! list of their resolv.conf, over UDP and then TCP (`RES_OPTIONS=use-vc`). Needs root; see
//! `ambit_tests::require_root`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{exec_in, in_netns, Pod, Topology};
use ambit_ztunnel::dns::DnsSettings;
use anyhow::Context;
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

const VIP: &str = "10.96.0.10";
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const RATE: u32 = 40;
const DNS_REQUESTS: &str = "istio_dns_requests_total";

/// The pod's resolv.conf as `ip netns exec` shows it (`/etc/netns/<name>/resolv.conf`), the
/// way a Kubernetes pod in namespace `demo` has it; removed on Drop.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn write(pod: &Pod, nameserver: Ipv4Addr) -> anyhow::Result<Self> {
        let dir = PathBuf::from("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {nameserver}\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\n\
                 options ndots:5 timeout:2 attempts:2\n"
            ),
        )?;
        Ok(ResolvConf(dir))
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real DNS server for the pods' upstream (UDP and TCP on port 53 of its pod): it knows
/// one name, `www.example.test` (A 192.0.2.7), says NXDOMAIN to everything else, and
/// records every question with the address it came from.
struct Upstream {
    seen: Arc<Mutex<Vec<(IpAddr, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Upstream {
    async fn start(pod: &Pod) -> anyhow::Result<Self> {
        let ip = pod.ip;
        let (udp, tcp) = in_netns(&pod.netns, move || {
            let udp = std::net::UdpSocket::bind((ip, 53))?;
            let tcp = std::net::TcpListener::bind((ip, 53))?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            Ok::<_, std::io::Error>((udp, tcp))
        })??;
        let (udp, tcp) = (
            tokio::net::UdpSocket::from_std(udp)?,
            tokio::net::TcpListener::from_std(tcp)?,
        );
        let seen: Arc<Mutex<Vec<(IpAddr, String)>>> = Arc::default();
        let udp_task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut buf = vec![0u8; 65535];
                while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                    if let Some(answer) = Self::answer(&seen, from.ip(), &buf[..n]) {
                        let _ = udp.send_to(&answer, from).await;
                    }
                }
            }
        });
        let tcp_task = tokio::spawn({
            let seen = seen.clone();
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok((mut s, from)) = tcp.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        while let Ok(len) = s.read_u16().await {
                            let mut q = vec![0u8; usize::from(len)];
                            if s.read_exact(&mut q).await.is_err() {
                                return;
                            }
                            let Some(a) = Self::answer(&seen, from.ip(), &q) else {
                                return;
                            };
                            let mut framed = (a.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&a);
                            if s.write_all(&framed).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Ok(Upstream {
            seen,
            tasks: vec![udp_task, tcp_task],
        })
    }

    fn answer(seen: &Mutex<Vec<(IpAddr, String)>>, from: IpAddr, query: &[u8]) -> Option<Vec<u8>> {
        let query = Message::from_vec(query).ok()?;
        let q = query.queries.first()?.clone();
        let name = q.name().to_ascii().to_ascii_lowercase();
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((from, name.clone()));
        let mut m = Message::response(query.metadata.id, query.metadata.op_code);
        m.metadata.recursion_desired = query.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.add_query(q.clone());
        match (name.as_str(), q.query_type()) {
            ("www.example.test.", RecordType::A) => {
                m.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A(EXTERNAL)),
                ));
            }
            ("www.example.test.", _) => {}
            _ => m.metadata.response_code = ResponseCode::NXDomain,
        }
        m.to_vec().ok()
    }

    fn asked(&self, name: &str) -> Vec<IpAddr> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, n)| n == name)
            .map(|(ip, _)| *ip)
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `getent ahostsv4 NAME` in `pod` (the C library's resolver, its search list and
/// `ndots`), over TCP when `tcp`; the first address it prints.
async fn getent(pod: &Pod, name: &str, tcp: bool) -> anyhow::Result<Ipv4Addr> {
    let (netns, name) = (pod.netns.clone(), name.to_owned());
    blocking(move || {
        let mut cmd = vec!["env"];
        if tcp {
            cmd.push("RES_OPTIONS=use-vc");
        }
        cmd.extend(["getent", "ahostsv4", &name]);
        let out = exec_in(&netns, &cmd).with_context(|| format!("resolve {name} (tcp: {tcp})"))?;
        let first = out.split_whitespace().next().unwrap_or_default();
        first
            .parse()
            .with_context(|| format!("getent printed {out:?} for {name}"))
    })
    .await
}

/// A UDP socket inside `pod`, talking to `server` (port 53 of some address: captured).
fn pod_udp(pod: &Pod, server: SocketAddr) -> anyhow::Result<UdpSocket> {
    let bind = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = in_netns(&pod.netns, move || UdpSocket::bind(bind))??;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(socket)
}

fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    m.to_vec().expect("encode")
}

/// Sends `bytes` and reads one answer.
fn exchange(socket: &UdpSocket, bytes: &[u8]) -> anyhow::Result<Message> {
    socket.send(bytes)?;
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf).context("no DNS answer")?;
    Ok(Message::from_vec(&buf[..n])?)
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_resolve_mesh_names_through_ztunnel_and_the_rest_upstream() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_dns")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("flooder", "n1")
        .pod("resolver", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, flooder, resolver) = (
        topo.pod("client"),
        topo.pod("flooder"),
        topo.pod("resolver"),
    );
    let upstream = Upstream::start(resolver).await?;
    // Read when the pods are enrolled, so written first.
    let _conf = (
        ResolvConf::write(client, resolver.ip)?,
        ResolvConf::write(flooder, resolver.ip)?,
    );
    let state = format!(
        "workloads:\n{}{}services:\n  - name: echo\n    namespace: demo\n    vips: [{VIP}]\n    ports: [{{port: 80, targetPort: 8080}}]\n",
        // Known by both addresses: its IPv6 is captured too.
        workload(client, "demo", "client", "n1", true).replace(
            &format!("addresses: [{}]", client.ip),
            &format!("addresses: [{}, '{}']", client.ip, client.ip6),
        ),
        workload(flooder, "demo", "flooder", "n1", true),
    );
    let ca = TestCa::new(Duration::from_secs(3600));
    let mesh = Mesh::start(&topo, &["n1"], &state, ca, |_, c| {
        c.dns = DnsSettings {
            query_rate: RATE,
            query_burst: RATE,
            ..DnsSettings::default()
        };
    })
    .await?;
    mesh.wait_enrolled("n1", &uid("demo", client), true).await?;
    mesh.wait_enrolled("n1", &uid("demo", flooder), true)
        .await?;
    let n1 = mesh.app("n1");
    let vip: Ipv4Addr = VIP.parse()?;

    // 1. The service's name in the three forms a pod in its namespace uses, over UDP and
    // TCP. The upstream knows none of them (it would say NXDOMAIN): ztunnel answered.
    for tcp in [false, true] {
        for name in ["echo.demo.svc.cluster.local", "echo.demo", "echo"] {
            assert_eq!(getent(client, name, tcp).await?, vip, "{name} (tcp: {tcp})");
        }
    }
    assert!(
        upstream.asked("echo.demo.svc.cluster.local.").is_empty(),
        "a mesh name reached the upstream"
    );
    // `echo.demo` has fewer dots than ndots: the resolver tried the search list first, and
    // the expansion that is not a mesh name went upstream (NXDOMAIN) before the one that is.
    assert!(!upstream
        .asked("echo.demo.demo.svc.cluster.local.")
        .is_empty());

    // 2. An unknown name resolves through the pod's upstream, over UDP and TCP; the query
    // left from the pod itself (its address), not from the node.
    for tcp in [false, true] {
        assert_eq!(getent(client, "www.example.test", tcp).await?, EXTERNAL);
    }
    let from = upstream.asked("www.example.test.");
    assert!(from.len() >= 2, "{from:?}");
    assert!(
        from.iter().all(|ip| *ip == IpAddr::from(client.ip)),
        "{from:?}"
    );
    eventually("forwarded queries counted", || {
        metric(
            n1,
            DNS_REQUESTS,
            &[("source_workload", "client"), ("outcome", "forwarded")],
        ) >= 2
    })
    .await?;

    // 3. Raw queries to port 53 of any address are captured. A v4-only service has no
    // AAAA: NOERROR and no answer. A malformed query gets FORMERR with its ID, and the next
    // valid query on the same socket is answered.
    let socket = pod_udp(client, SocketAddr::new(vip.into(), 53))?;
    let m = exchange(
        &socket,
        &query(7, "echo.demo.svc.cluster.local.", RecordType::AAAA),
    )?;
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (7, ResponseCode::NoError)
    );
    assert!(m.answers.is_empty(), "{m:?}");
    let mut junk = query(8, "echo.demo.svc.cluster.local.", RecordType::A);
    junk.truncate(19);
    junk.extend_from_slice(&[0xff; 9]);
    let m = exchange(&socket, &junk)?;
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (8, ResponseCode::FormErr)
    );
    let m = exchange(
        &socket,
        &query(9, "echo.demo.svc.cluster.local.", RecordType::A),
    )?;
    assert_eq!((m.metadata.id, a_records(&m)), (9, vec![VIP.to_string()]));
    assert!(metric(n1, DNS_REQUESTS, &[("outcome", "malformed")]) >= 1);
    // The same over IPv6 (ip6tables' capture, the [::1] listener): the answer comes back as
    // from the resolver the pod addressed.
    let socket6 = pod_udp(client, SocketAddr::new(resolver.ip6.into(), 53))?;
    let m = exchange(&socket6, &query(10, "echo.", RecordType::A))?;
    assert_eq!((m.metadata.id, a_records(&m)), (10, vec![VIP.to_string()]));

    // 4. A flood from one pod: past its burst it gets REFUSED, counted; the other pod's
    // queries, at the same time, are all answered.
    let flood = pod_udp(flooder, SocketAddr::new(resolver.ip.into(), 53))?;
    let calm = pod_udp(client, SocketAddr::new(resolver.ip.into(), 53))?;
    let sent = 400u16;
    let (mut refused, mut answered) = (0u32, 0u32);
    let started = std::time::Instant::now();
    for id in 0..sent {
        let m = exchange(
            &flood,
            &query(id, "echo.demo.svc.cluster.local.", RecordType::A),
        )?;
        match m.metadata.response_code {
            ResponseCode::Refused => refused += 1,
            ResponseCode::NoError => answered += 1,
            other => panic!("flood answer {other:?}"),
        }
        if id % 40 == 0 {
            let m = exchange(&calm, &query(id, "echo.", RecordType::A))?;
            assert_eq!(a_records(&m), [VIP], "the other pod during the flood");
        }
    }
    let took = started.elapsed();
    println!("flood: {sent} queries in {took:?}, {answered} answered, {refused} refused");
    assert_eq!(refused + answered, u32::from(sent));
    // The burst, plus what the rate refilled while the flood lasted, and not one more.
    let allowed = RATE + (f64::from(RATE) * took.as_secs_f64()).ceil() as u32;
    assert!(
        (RATE..=allowed).contains(&answered),
        "{answered} answered, the bucket allows {RATE} to {allowed} in {took:?}"
    );
    assert!(refused > 0, "nothing refused");
    let counted = metric(
        n1,
        DNS_REQUESTS,
        &[("source_workload", "flooder"), ("outcome", "rate_limited")],
    );
    assert_eq!(counted, u64::from(refused));
    assert_eq!(
        metric(
            n1,
            DNS_REQUESTS,
            &[("source_workload", "client"), ("outcome", "rate_limited")],
        ),
        0
    );
    assert_eq!(getent(client, "echo", false).await?, vip);

    drop(upstream);
    mesh.shutdown().await;
    Ok(())
}
