//! ztunnel end to end, IPv6: every pod of the topology is dual-stack, ztunnel carries IPv4 only,
//! so an enrolled pod's IPv6 must be closed, never a way around the mesh. Written as the
//! attack: an enrolled pod talks IPv6 (TCP and UDP, to a meshed pod and to one outside the
//! mesh), a pod outside the mesh talks IPv6 to an enrolled one, and a sniffer on the fabric
//! looks for the payload. Needs root; see `ambit_tests::require_root`.

mod ztunnel_support;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use ambit_tests::{in_netns, Pod, ReplyServer, Topology};
use ztunnel_support::*;

/// Connect timeout of attempts that must fail: refused ones fail at once, dropped ones after
/// this, which keeps the test cheap.
const SHORT: Duration = Duration::from_secs(1);

/// Tries a TCP connection from `pod` to `dst`; `Ok` is a connection that was let through.
async fn try_connect(pod: &Pod, dst: SocketAddr) -> anyhow::Result<std::io::Result<TcpStream>> {
    let netns = pod.netns.clone();
    blocking(move || in_netns(&netns, move || TcpStream::connect_timeout(&dst, SHORT))).await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_pods_ipv6_is_closed_and_never_crosses_the_fabric_in_plaintext(
) -> anyhow::Result<()> {
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
    assert_eq!(seen.ip(), std::net::IpAddr::from(client.ip6));

    let state = format!(
        "workloads:\n{}{}{}{}",
        workload(client, "app", "client", "n1", true),
        workload(server, "app", "server", "n2", true),
        workload(plain_c, "legacy", "default", "n1", false),
        workload(plain_s, "legacy", "default", "n2", false),
    );
    let mesh = Mesh::start(
        &topo,
        &["n1", "n2"],
        &state,
        TestCa::new(Duration::from_secs(3600)),
        |_, _| {},
    )
    .await?;
    mesh.wait_enrolled("n1", &uid("app", client), true).await?;
    mesh.wait_enrolled("n2", &uid("app", server), true).await?;
    let accepted_before = server6.seen().len();
    for pod in [client, server] {
        let rules = ambit_tests::exec_in(&pod.netns, &["ip6tables-save"])?;
        assert!(
            rules.contains("-A OUTPUT -j AMBIT_OUTPUT")
                && rules.contains("-A INPUT -j AMBIT_INPUT"),
            "{}: IPv6 not closed:\n{rules}",
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

    // Un-enrolling removes the IPv6 rules with the IPv4 ones: IPv6 works again.
    let unenrolled = state.replace("protocol: HBONE", "protocol: TCP");
    mesh.set_state(&unenrolled).await?;
    mesh.wait_enrolled("n1", &uid("app", client), false).await?;
    mesh.wait_enrolled("n2", &uid("app", server), false).await?;
    let rules = ambit_tests::exec_in(&client.netns, &["ip6tables-save"])?;
    assert!(!rules.contains("AMBIT"), "IPv6 rules left behind:\n{rules}");
    let seen = round_trip(client, server6.addr(), b"after").await?;
    assert_eq!(seen.ip(), std::net::IpAddr::from(client.ip6));

    drop((server4, server6, plain6));
    mesh.shutdown().await;
    Ok(())
}
