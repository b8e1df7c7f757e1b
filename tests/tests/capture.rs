//! ztunnel's in-pod capture against real network namespaces and iptables (needs root; see
//! `ambit_tests::require_root`). Each test builds its own nodes and pods, enrolls pods with the
//! real `CaptureManager`, and asserts on what applications and ztunnel's listeners see: the
//! addresses on both ends, the bytes, and the rules left in the namespace.
//!
//! Run with a modest `--test-threads`: every test creates namespaces and runs iptables.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ambit_tests::server::parse_greeting;
use ambit_tests::{
    connect_from, echo, exec_in, in_netns, read_greeting, Pod, ReplyServer, Topology,
};
use ambit_ztunnel::capture::iptables;
use ambit_ztunnel::capture::{
    dedicated, original_dst, Backend, CaptureConfig, CaptureManager, Ipv6Capture, NetnsHandle,
    NetnsWorker, RuleConfig,
};
use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

fn manager(topo: &Topology, rules: RuleConfig) -> CaptureManager {
    CaptureManager::new(CaptureConfig {
        netns_dir: topo.netns_dir().to_path_buf(),
        rules,
    })
}

fn ip(pod: &Pod) -> IpAddr {
    pod.ip.into()
}

/// Fails instead of hanging when a capture is broken.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(WAIT, fut)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// Reads one `\n`-terminated line from a tokio stream, byte by byte (so nothing after it is lost).
async fn read_line(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    loop {
        let byte = within("a line", stream.read_u8()).await??;
        if byte == b'\n' {
            return Ok(String::from_utf8(line)?);
        }
        line.push(byte);
    }
}

async fn read_exactly(stream: &mut TcpStream, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    within("bytes", stream.read_exact(&mut buf)).await??;
    Ok(buf)
}

/// Runs a blocking fixture call off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

fn save(pod: &Pod, program: &str) -> anyhow::Result<String> {
    exec_in(&pod.netns, &[program])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_capture_redirects_the_app_but_not_ztunnel() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("outbound_capture")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let server = ReplyServer::start(&b, 8080)?;
    let target = server.addr();

    // Before enrollment the app reaches the server directly (the topology routes).
    let mut direct = connect_from(&a, target)?;
    assert_eq!(read_greeting(&mut direct)?.peer.ip(), ip(&a));
    drop(direct);

    let mgr = manager(&topo, RuleConfig::default());
    let pod = mgr.enroll(ip(&a), "uid-a").await?;
    let listeners = pod.take_listeners().context("listeners already taken")?;

    let (a2, t2) = (a.clone(), target);
    let mut app = blocking(move || connect_from(&a2, t2)).await?;
    let (mut accepted, peer) = within("outbound accept", listeners.outbound.accept()).await??;
    assert_eq!(original_dst(&accepted)?, target, "SO_ORIGINAL_DST");
    assert_eq!(peer.ip(), ip(&a), "the app dials from its pod IP");
    assert_eq!(peer.port(), app.local_addr()?.port());
    app.write_all(b"to-ztunnel")?;
    assert_eq!(read_exactly(&mut accepted, 10).await?, b"to-ztunnel");
    assert_eq!(
        server.seen().len(),
        1,
        "the captured dial must not reach the server"
    );

    // ztunnel's own (marked) socket from the factory goes straight through, from the pod IP.
    let mut own = within("marked dial", pod.sockets().connect(target)).await??;
    let seen = parse_greeting(&read_line(&mut own).await?)?;
    assert_eq!(seen.local, target);
    assert_eq!(
        seen.peer.ip(),
        ip(&a),
        "ztunnel's outbound leaves from the pod IP"
    );
    assert_eq!(seen.peer, own.local_addr()?);
    own.write_all(b"marked").await?;
    assert_eq!(read_exactly(&mut own, 6).await?, b"marked");
    assert_eq!(server.seen().len(), 2);

    assert!(mgr.remove("uid-a").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_plaintext_reaches_15006_with_original_addresses() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("inbound_plaintext")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let app = ReplyServer::start(&b, 9000)?;
    let mgr = manager(&topo, RuleConfig::default());
    let pod = mgr.enroll(ip(&b), "uid-b").await?;
    let listeners = pod.take_listeners().context("listeners already taken")?;

    let (a2, dst) = (a.clone(), app.addr());
    let mut client = blocking(move || connect_from(&a2, dst)).await?;
    let (mut accepted, peer) = within("inbound accept", listeners.inbound.accept()).await??;
    assert_eq!(
        accepted.local_addr()?,
        app.addr(),
        "local_addr is the original destination"
    );
    assert_eq!(
        peer,
        client.local_addr()?,
        "peer is the real client, port included"
    );
    assert_eq!(peer.ip(), ip(&a));
    client.write_all(b"inbound")?;
    assert_eq!(read_exactly(&mut accepted, 7).await?, b"inbound");
    accepted.write_all(b"back").await?;
    let mut back = [0u8; 4];
    std::io::Read::read_exact(&mut client, &mut back)?;
    assert_eq!(&back, b"back");
    assert!(
        app.seen().is_empty(),
        "the app must not see a captured connection"
    );

    mgr.remove("uid-b").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_is_captured_on_its_own_listeners_with_original_addresses() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("capture_v6")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let app_b = ReplyServer::start_v6(&b, 9000)?;
    let app_a = ReplyServer::start_v6(&a, 9001)?;
    let mgr = manager(&topo, RuleConfig::default());
    let pod = mgr.enroll(ip(&a), "uid-a").await?;
    let listeners = pod.take_listeners().context("listeners already taken")?;
    let v6 = listeners.ipv6.context("IPv6 not captured")?;
    assert_eq!(v6.outbound.local_addr()?, "[::1]:15001".parse()?);
    assert_eq!(v6.hbone.local_addr()?, "[::]:15008".parse()?);

    // Outbound: the app's IPv6 connection lands on [::1]:15001, IP6T_SO_ORIGINAL_DST names
    // the target; nothing reaches it.
    let (a2, dst) = (a.clone(), app_b.addr());
    let mut out = blocking(move || connect_from(&a2, dst)).await?;
    let (mut accepted, peer) = within("IPv6 outbound accept", v6.outbound.accept()).await??;
    assert_eq!(
        original_dst(&accepted)?,
        app_b.addr(),
        "IP6T_SO_ORIGINAL_DST"
    );
    assert_eq!(peer.ip(), IpAddr::from(a.ip6));
    out.write_all(b"out6")?;
    assert_eq!(read_exactly(&mut accepted, 4).await?, b"out6");
    assert!(
        app_b.seen().is_empty(),
        "the captured IPv6 dial reached the server"
    );

    // Inbound plaintext: TPROXYed to [::]:15006 with the original addresses.
    let (b2, dst) = (b.clone(), app_a.addr());
    let mut inc = blocking(move || connect_from(&b2, dst)).await?;
    let (mut accepted, peer) = within("IPv6 inbound accept", v6.inbound.accept()).await??;
    assert_eq!(accepted.local_addr()?, app_a.addr(), "original destination");
    assert_eq!(peer, inc.local_addr()?, "the real client");
    inc.write_all(b"in6")?;
    assert_eq!(read_exactly(&mut accepted, 3).await?, b"in6");
    assert!(
        app_a.seen().is_empty(),
        "the captured IPv6 connection reached the app"
    );

    // ztunnel dials the app as the IPv6 client from inside the pod, and the replies come back.
    let mut spoofed = within(
        "transparent IPv6 dial",
        pod.sockets().connect_from(b.ip6.into(), app_a.addr()),
    )
    .await??;
    let seen = parse_greeting(&read_line(&mut spoofed).await?)?;
    assert_eq!(seen.peer.ip(), IpAddr::from(b.ip6));
    assert!(
        listeners.outbound.local_addr()?.is_ipv4(),
        "the IPv4 listeners are still there"
    );

    // Asked to close IPv6 instead: no IPv6 listeners, and the app's IPv6 is refused.
    drop((
        v6,
        listeners.outbound,
        listeners.inbound,
        listeners.hbone,
        spoofed,
    ));
    let closed = mgr
        .enroll_with(ip(&a), "uid-a", Ipv6Capture::Closed)
        .await?;
    let listeners = closed.take_listeners().context("listeners already taken")?;
    assert!(listeners.ipv6.is_none(), "IPv6 listeners for a closed pod");
    let (a3, dst) = (a.clone(), app_b.addr());
    let refused = blocking(move || {
        in_netns(&a3.netns, move || {
            std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1))
        })
    })
    .await?;
    assert!(refused.is_err(), "IPv6 of a closed pod was let out");
    assert!(!save(&a, "ip6tables-save")?.contains("TPROXY"));
    assert!(app_b.seen().is_empty());

    mgr.remove("uid-a").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_dials_the_app_from_the_client_ip() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("connect_from_client")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let app = ReplyServer::start(&b, 9000)?;
    let mgr = manager(&topo, RuleConfig::default());
    let pod = mgr.enroll(ip(&b), "uid-b").await?;
    let listeners = pod.take_listeners().context("listeners already taken")?;

    // The bare factory call: an IP_TRANSPARENT socket bound to A's IP, inside B.
    let mut spoofed = within(
        "transparent dial",
        pod.sockets().connect_from(ip(&a), app.addr()),
    )
    .await??;
    let seen = parse_greeting(&read_line(&mut spoofed).await?)?;
    assert_eq!(seen.local, app.addr());
    assert_eq!(seen.peer.ip(), ip(&a), "the app sees the client's IP");
    spoofed.write_all(b"ping").await?;
    assert_eq!(
        read_exactly(&mut spoofed, 4).await?,
        b"ping",
        "replies come back to ztunnel"
    );

    // The whole inbound path: A dials B:9000, ztunnel accepts on 15006 and relays from A's IP.
    let factory = pod.sockets().clone();
    let relay = tokio::spawn(async move {
        let (mut inbound, peer) = listeners.inbound.accept().await?;
        let mut upstream = factory
            .connect_from(peer.ip(), inbound.local_addr()?)
            .await?;
        tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await?;
        anyhow::Ok(())
    });
    let (a2, dst) = (a.clone(), app.addr());
    let (seen, echoed, client_addr) = blocking(move || {
        let mut client = connect_from(&a2, dst)?;
        let seen = read_greeting(&mut client)?;
        let echoed = echo(&mut client, b"through ztunnel")?;
        Ok((seen, echoed, client.local_addr()?))
    })
    .await?;
    assert_eq!(
        seen.peer.ip(),
        client_addr.ip(),
        "app sees the real client IP"
    );
    assert_ne!(
        seen.peer, client_addr,
        "but through ztunnel's socket, not the client's"
    );
    assert_eq!(seen.local, app.addr());
    assert_eq!(echoed, b"through ztunnel");
    within("relay end", relay).await???;
    assert_eq!(app.seen().len(), 2);

    mgr.remove("uid-b").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_port_is_reachable_from_another_pod() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("hbone_listener")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let mgr = manager(&topo, RuleConfig::default());
    let pod = mgr.enroll(ip(&b), "uid-b").await?;
    let listeners = pod.take_listeners().context("listeners already taken")?;

    let dst = SocketAddr::new(ip(&b), 15008);
    let a2 = a.clone();
    let mut client = blocking(move || connect_from(&a2, dst)).await?;
    let (mut accepted, peer) = within("hbone accept", listeners.hbone.accept()).await??;
    assert_eq!(accepted.local_addr()?, dst);
    assert_eq!(peer, client.local_addr()?);
    client.write_all(b"h2")?;
    assert_eq!(read_exactly(&mut accepted, 2).await?, b"h2");
    // And nothing went to the plaintext port.
    let stray = tokio::time::timeout(Duration::from_millis(200), listeners.inbound.accept()).await;
    assert!(
        stray.is_err(),
        "15008 traffic must not be TPROXYed to 15006"
    );

    mgr.remove("uid-b").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_removes_rules_routes_and_listeners() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("teardown")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let server = ReplyServer::start(&b, 8080)?;
    let mgr = manager(&topo, RuleConfig::default());

    let ghost = mgr.enroll("10.77.9.9".parse()?, "uid-ghost").await;
    let err = format!(
        "{:#}",
        anyhow::Error::from(ghost.err().context("ghost enrolled")?)
    );
    assert!(err.contains("pod uid-ghost"), "{err}");
    assert!(
        err.contains(&format!(
            "no network namespace under {} has address 10.77.9.9",
            topo.netns_dir().display()
        )),
        "{err}"
    );

    let _pod = mgr.enroll(ip(&a), "uid-a").await?;
    // The checks below can see our rules when they are there.
    let saved = save(&a, "iptables-save")?;
    assert!(saved.contains("-A PREROUTING -j AMBIT_PRERT"), "{saved}");
    assert!(
        saved.contains(
            "-A AMBIT_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 15001"
        ),
        "{saved}"
    );
    assert!(
        exec_in(&a.netns, &["ip", "-4", "rule", "show"])?.contains("fwmark 0x111/0xfff lookup 133")
    );
    // IPv6 is captured beside IPv4, and what it cannot carry is dropped.
    let saved6 = save(&a, "ip6tables-save")?;
    assert!(saved6.contains("-A OUTPUT -j AMBIT_OUTPUT"), "{saved6}");
    assert!(saved6.contains("-A AMBIT_INPUT -j DROP"), "{saved6}");
    assert!(saved6.contains("-A PREROUTING -j AMBIT_PRERT"), "{saved6}");
    assert!(
        exec_in(&a.netns, &["ip", "-6", "rule", "show"])?.contains("fwmark 0x111/0xfff lookup 133")
    );
    assert!(
        exec_in(&a.netns, &["ip", "-4", "route", "show", "table", "133"])?
            .contains("local default dev lo")
    );

    assert!(mgr.remove("uid-a").await?);
    assert!(!mgr.remove("uid-a").await?, "second remove is a no-op");

    let saved = save(&a, "iptables-save")?;
    assert!(!saved.contains("AMBIT"), "rules left behind:\n{saved}");
    let saved6 = save(&a, "ip6tables-save")?;
    assert!(
        !saved6.contains("AMBIT"),
        "IPv6 rules left behind:\n{saved6}"
    );
    let rules = exec_in(&a.netns, &["ip", "-4", "rule", "show"])?;
    assert!(
        !rules.contains("fwmark"),
        "policy rule left behind:\n{rules}"
    );
    let routes = exec_in(&a.netns, &["ip", "-4", "route", "show", "table", "133"])?;
    assert!(routes.trim().is_empty(), "routes left behind:\n{routes}");
    let rules = exec_in(&a.netns, &["ip", "-6", "rule", "show"])?;
    assert!(
        !rules.contains("fwmark"),
        "IPv6 policy rule left behind:\n{rules}"
    );

    // Traffic flows directly again, and nothing listens on the capture ports.
    let (a2, dst) = (a.clone(), server.addr());
    let (seen, local) = blocking(move || {
        let mut s = connect_from(&a2, dst)?;
        Ok((read_greeting(&mut s)?, s.local_addr()?))
    })
    .await?;
    assert_eq!(seen.peer, local, "direct connection after teardown");
    let a3 = a.clone();
    let refused =
        blocking(move || Ok(connect_from(&a3, "127.0.0.1:15001".parse()?).is_err())).await?;
    assert!(refused, "15001 still listening after teardown");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_and_remove_without_restarting_the_app() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("no_restart")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let app = ReplyServer::start(&b, 9000)?;
    let dst = app.addr();

    // Connections from before enrollment: into the pod, and out of it.
    let mut before = connect_from(&a, dst)?;
    read_greeting(&mut before)?;
    assert_eq!(echo(&mut before, b"1")?, b"1");
    let remote = ReplyServer::start(&a, 8080)?;
    let mut outgoing = connect_from(&b, remote.addr())?;
    read_greeting(&mut outgoing)?;

    let mgr = manager(&topo, RuleConfig::default());
    let pod = mgr.enroll(ip(&b), "uid-b").await?;
    let again = mgr.enroll(ip(&b), "uid-b").await?;
    assert!(
        std::sync::Arc::ptr_eq(&pod, &again),
        "re-enroll returns the same capture"
    );
    let listeners = pod.take_listeners().context("listeners already taken")?;

    // The old connections are not captured mid-stream.
    let (mut before, outgoing) = blocking(move || {
        assert_eq!(echo(&mut before, b"during")?, b"during");
        assert_eq!(echo(&mut outgoing, b"out")?, b"out");
        Ok((before, outgoing))
    })
    .await?;
    drop(outgoing);

    // A new one is, and ztunnel hands it to the same, never restarted, app.
    let factory = pod.sockets().clone();
    let relay = tokio::spawn(async move {
        let (mut inbound, peer) = listeners.inbound.accept().await?;
        let mut upstream = factory
            .connect_from(peer.ip(), inbound.local_addr()?)
            .await?;
        tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await?;
        anyhow::Ok(())
    });
    let a2 = a.clone();
    let (seen, echoed) = blocking(move || {
        let mut c = connect_from(&a2, dst)?;
        Ok((read_greeting(&mut c)?, echo(&mut c, b"captured")?))
    })
    .await?;
    assert_eq!(seen.peer.ip(), ip(&a));
    assert_eq!(echoed, b"captured");
    within("relay end", relay).await???;

    assert!(mgr.remove("uid-b").await?);
    let before = blocking(move || {
        assert_eq!(echo(&mut before, b"after")?, b"after");
        Ok(before)
    })
    .await?;
    drop(before);

    let a3 = a.clone();
    let (seen, local) = blocking(move || {
        let mut c = connect_from(&a3, dst)?;
        Ok((read_greeting(&mut c)?, c.local_addr()?))
    })
    .await?;
    assert_eq!(
        seen.peer, local,
        "after removal the app is reached directly"
    );
    assert_eq!(
        app.seen().len(),
        3,
        "one listening socket served all three connections"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_backend_and_idempotent_reapply() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("legacy_reapply")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let rules = RuleConfig {
        backend: Backend::Legacy,
        ..RuleConfig::default()
    };
    let mgr = manager(&topo, rules.clone());
    let pod = mgr.enroll(ip(&a), "uid-a").await?;
    let listeners = pod.take_listeners().context("listeners already taken")?;

    // Apply twice more by hand: still exactly one jump each, one policy rule.
    let worker = NetnsWorker::spawn(NetnsHandle::open(pod.netns().path())?)?;
    for _ in 0..2 {
        let cfg = rules.clone();
        let adopted = worker.run(move || iptables::apply(&cfg)).await??;
        assert!(adopted, "current rules are adopted, not re-applied");
    }
    let saved = save(&a, "iptables-legacy-save")?;
    assert_eq!(
        saved.matches("-A PREROUTING -j AMBIT_PRERT").count(),
        1,
        "{saved}"
    );
    assert_eq!(
        saved.matches("-A OUTPUT -j AMBIT_OUTPUT").count(),
        2,
        "mangle+nat:\n{saved}"
    );
    assert_eq!(
        saved.matches("REDIRECT --to-ports 15001").count(),
        1,
        "{saved}"
    );
    let nft = save(&a, "iptables-nft-save")?;
    assert!(
        !nft.contains("AMBIT"),
        "legacy backend wrote nft rules:\n{nft}"
    );
    let rule_list = exec_in(&a.netns, &["ip", "-4", "rule", "show"])?;
    assert_eq!(
        rule_list.matches("fwmark 0x111/0xfff").count(),
        1,
        "{rule_list}"
    );

    // And the legacy rules capture.
    let target = SocketAddr::new(ip(&b), 8080);
    let a2 = a.clone();
    let _app = blocking(move || connect_from(&a2, target)).await?;
    let (accepted, _) = within("outbound accept", listeners.outbound.accept()).await??;
    assert_eq!(original_dst(&accepted)?, target);

    assert!(mgr.remove("uid-a").await?);
    let saved = save(&a, "iptables-legacy-save")?;
    assert!(!saved.contains("AMBIT"), "{saved}");
    Ok(())
}

#[test]
fn dedicated_mode_captures_the_current_namespace() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("dedicated")
        .node("n1")
        .node("n2")
        .pod("vm", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (vm, b) = (topo.pod("vm").clone(), topo.pod("b").clone());
    let server = ReplyServer::start(&b, 8080)?;
    let target = server.addr();
    // A "VM": this thread (and its single-threaded runtime) live in the pod's namespace, the
    // way a dedicated ztunnel process lives in its machine's.
    let result = in_netns(&vm.netns, move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let pod = dedicated("vm", RuleConfig::dedicated()).await?;
            // The dedicated-mode exclusions (ztunnel's own ports, the controller) are installed.
            let saved =
                String::from_utf8(std::process::Command::new("iptables-save").output()?.stdout)?;
            assert!(saved.contains("-A AMBIT_PRERT -p tcp -m tcp --dport 15020 -j RETURN"));
            assert!(saved.contains("-A AMBIT_OUTPUT -p tcp -m tcp --dport 15012 -j RETURN"));
            let listeners = pod.take_listeners().context("listeners already taken")?;
            let mut app = TcpStream::connect(target).await?;
            let (mut accepted, _) =
                within("outbound accept", listeners.outbound.accept()).await??;
            assert_eq!(original_dst(&accepted)?, target);
            app.write_all(b"vm").await?;
            assert_eq!(read_exactly(&mut accepted, 2).await?, b"vm");
            let mut own = within("marked dial", pod.sockets().connect(target)).await??;
            let seen = parse_greeting(&read_line(&mut own).await?)?;
            assert_eq!(seen.peer, own.local_addr()?);
            pod.teardown().await?;
            let mut again = TcpStream::connect(target).await?;
            let seen = parse_greeting(&read_line(&mut again).await?)?;
            if seen.peer != again.local_addr()? {
                bail!("still captured after teardown: {seen:?}");
            }
            Ok(())
        })
    })?;
    result?;
    assert_eq!(server.seen().len(), 2);
    Ok(())
}

/// Our rules with their packet counters, as `iptables-save -c` shows them.
fn counted_rules(pod: &Pod) -> anyhow::Result<Vec<String>> {
    Ok(exec_in(&pod.netns, &["iptables-save", "-c"])?
        .lines()
        .filter(|l| l.contains("AMBIT"))
        .map(str::to_owned)
        .collect())
}

/// The rules belong to the pod, not to the capture object: dropping it (ztunnel exiting or
/// dying) leaves them, so the pod's connections are refused; a new capture adopts them without
/// touching them (their packet counters survive) and serves again; only teardown removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_capture_leaves_its_rules_and_a_new_one_adopts_them() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("drop_adopt")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let server = ReplyServer::start(&b, 8080)?;
    let target = server.addr();
    let (a_ip, a_path) = (ip(&a), topo.netns_dir().join(&a.netns));
    let start = || {
        let handle = NetnsHandle::open(&a_path);
        async move {
            ambit_ztunnel::capture::CapturedPod::start(
                "uid-a",
                Some(a_ip),
                handle?,
                RuleConfig::default(),
            )
            .await
            .map_err(anyhow::Error::from)
        }
    };
    let pod = start().await?;
    drop(pod.take_listeners());
    drop(pod);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let saved = save(&a, "iptables-save")?;
    assert!(
        saved.contains(&iptables::marker_chain(&RuleConfig::default())),
        "{saved}"
    );
    assert!(exec_in(&a.netns, &["ip", "-4", "rule", "show"])?.contains("fwmark"));

    // Nobody serves the pod: its connections are refused, not let through.
    let a2 = a.clone();
    let refused = blocking(move || {
        in_netns(&a2.netns, move || {
            std::net::TcpStream::connect_timeout(&target, WAIT)
        })
    })
    .await?;
    match refused {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => bail!("expected a refused connect, got {other:?}"),
    }
    assert!(server.seen().is_empty(), "the app was reached");

    // A new capture adopts the rules as they are: same rules, same counters.
    let before = counted_rules(&a)?;
    assert!(
        before
            .iter()
            .any(|l| l.contains("REDIRECT") && !l.starts_with("[0:0]")),
        "the refused SYN was not counted: {before:?}"
    );
    let pod = start().await?;
    assert_eq!(counted_rules(&a)?, before, "adoption touched the rules");
    let listeners = pod.take_listeners().context("listeners already taken")?;
    let a2 = a.clone();
    let _app = blocking(move || connect_from(&a2, target)).await?;
    let (accepted, _) = within("outbound accept", listeners.outbound.accept()).await??;
    assert_eq!(original_dst(&accepted)?, target);

    // Only un-enrolling removes them.
    pod.teardown().await?;
    let saved = save(&a, "iptables-save")?;
    assert!(!saved.contains("AMBIT"), "{saved}");
    Ok(())
}

/// Both ends enrolled, HBONE replaced by a plain TCP hop with a one-line header: A's app dials
/// B's app; A's ztunnel takes it on 15001 and dials B:15008 from inside A (marked); B's ztunnel
/// takes that on 15008 and dials B's app as A's IP. The app must see A, bytes must flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_enrolled_end_to_end_through_15001_and_15008() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("end_to_end")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    let app = ReplyServer::start(&b, 9000)?;
    let mgr = manager(&topo, RuleConfig::default());
    let pod_a = mgr.enroll(ip(&a), "uid-a").await?;
    let pod_b = mgr.enroll(ip(&b), "uid-b").await?;
    let la = pod_a.take_listeners().context("listeners of a")?;
    let lb = pod_b.take_listeners().context("listeners of b")?;

    let (sock_a, sock_b) = (pod_a.sockets().clone(), pod_b.sockets().clone());
    let b_ip = ip(&b);
    let outbound = tokio::spawn(async move {
        let (mut app_conn, peer) = la.outbound.accept().await?;
        let dst = original_dst(&app_conn)?;
        let mut tunnel = sock_a.connect(SocketAddr::new(b_ip, 15008)).await?;
        tunnel
            .write_all(format!("{dst} {}\n", peer.ip()).as_bytes())
            .await?;
        tokio::io::copy_bidirectional(&mut app_conn, &mut tunnel).await?;
        anyhow::Ok(())
    });
    let inbound = tokio::spawn(async move {
        let (mut tunnel, _) = lb.hbone.accept().await?;
        let header = read_line(&mut tunnel).await?;
        let (dst, src) = header.split_once(' ').context("header")?;
        let (dst, src): (SocketAddr, IpAddr) = (dst.parse()?, src.parse()?);
        let mut upstream = sock_b.connect_from(src, dst).await?;
        tokio::io::copy_bidirectional(&mut tunnel, &mut upstream).await?;
        anyhow::Ok(())
    });

    let (a2, dst) = (a.clone(), app.addr());
    let (seen, echoed) = blocking(move || {
        let mut c = connect_from(&a2, dst)?;
        Ok((read_greeting(&mut c)?, echo(&mut c, b"across nodes")?))
    })
    .await?;
    assert_eq!(seen.peer.ip(), ip(&a), "B's app sees A's pod IP");
    assert_eq!(seen.local, app.addr());
    assert_eq!(echoed, b"across nodes");
    within("outbound side", outbound).await???;
    within("inbound side", inbound).await???;

    assert!(mgr.remove("uid-a").await?);
    assert!(mgr.remove("uid-b").await?);
    assert!(mgr.uids().await.is_empty());
    Ok(())
}
