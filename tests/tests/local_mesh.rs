//! The local mesh as a user runs it: `ambitctl up --detach` builds nodes and pods as network
//! namespaces (each pod through its node's real CNI chain: Debian's `bridge` and
//! `host-local`, then `ambit-cni`), starts the real controller, ztunnels and sample app,
//! `ambitctl pod create|delete` makes and removes one pod as a node does (CNI ADD/DEL), and
//! `ambitctl down` removes all of it. Asserts on what a user sees: the sample client's results, ztunnel's
//! metrics and access log, `apply`'s errors, the controller's log, and what is left after down.
//!
//! Runs the built binaries (`ambitctl`, `ambit-controller`, `ztunnel` in this target dir;
//! `cargo test --workspace` builds them). Each test has its own state dir and namespace
//! prefix, and a guard that runs `ambitctl down` when the test ends, also on panic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use ambit_tests::local_mesh::{ambitctl, http_echo_in, http_from, tempfile_dir, wait_for, Mesh};
use ambitctl::local::{admin, net, procs};

fn ok_results(log: &str) -> usize {
    log.lines().filter(|l| l.contains("\"ok\":true")).count()
}

fn host_links() -> BTreeSet<String> {
    net::run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .collect()
}

fn host_iptables() -> String {
    let out = net::run("iptables-save", &[]).unwrap_or_default();
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn sample_traffic_goes_over_hbone_a_deny_policy_is_enforced_and_down_removes_everything() {
    let links_before = host_links();
    let iptables_before = host_iptables();
    let Some(mesh) = Mesh::up("local_mesh_flow", "flow", "1") else {
        return;
    };
    let state = mesh.state();
    // 2 nodes x 1 pod: echo-1 on node1, client-1 on node2, so every call crosses nodes.
    wait_for(
        40,
        "the sample client to get replies",
        || mesh.client_log().contains("hello from demo/echo-1"),
        || mesh.client_log() + &mesh.log("ztunnel-node2.log"),
    );
    let log = mesh.client_log();
    let reply = log
        .lines()
        .rev()
        .find(|l| l.contains("\"ok\":true"))
        .unwrap_or_default()
        .to_owned();
    // The server saw the client pod's own address: no NAT anywhere in the mesh.
    assert!(reply.contains("you are 10.77.2.2:"), "{reply}");

    // The server's ztunnel counted mTLS connections with both identities.
    let node1 = state.node("node1").expect("node1").clone();
    let metrics = || {
        admin::get(
            &node1.netns,
            SocketAddr::from(([127, 0, 0, 1], 15020)),
            "/metrics",
        )
        .map(|(_, body)| body)
        .unwrap_or_default()
    };
    let body = metrics();
    let opened = body
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("destination_principal=\"spiffe://cluster.local/ns/demo/sa/echo\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .unwrap_or_else(|| panic!("no mTLS connection counted:\n{body}"));
    assert!(!opened.ends_with(" 0"), "{opened}");
    // The client's ztunnel logged the outbound call through HBONE with both identities.
    let access = mesh.log("ztunnel-node2.log");
    assert!(
        access.lines().any(|l| l.contains("\"target\":\"access\"")
            && l.contains("\"direction\":\"outbound\"")
            && l.contains("\"protocol\":\"hbone\"")
            && l.contains("\"src.identity\":\"spiffe://cluster.local/ns/demo/sa/client\"")
            && l.contains("\"dst.identity\":\"spiffe://cluster.local/ns/demo/sa/echo\"")
            && l.contains("\"outcome\":\"ok\"")),
        "{access}"
    );

    // The sample pods list their IPv6 address: IPv6 between them is meshed too. The client
    // (node 2) calls the echo server's IPv6 address on node 1; the server sees the client's
    // own IPv6 address and node 1's ztunnel logs the HBONE stream with its proven identity.
    let ip6 = |ip: std::net::Ipv4Addr| {
        let [_, _, k, j] = ip.octets();
        net::pod_ip6(usize::from(k), usize::from(j) - 2).expect("IPv6 plan")
    };
    let by_name = |prefix: &str| {
        state
            .pods
            .iter()
            .find(|p| p.name.starts_with(prefix))
            .unwrap_or_else(|| panic!("a pod named {prefix}* in cluster.json"))
            .clone()
    };
    let (echo, client) = (by_name("echo"), by_name("client"));
    let (echo6, client6) = (ip6(echo.ip), ip6(client.ip));
    let dst = SocketAddr::new(echo6.into(), 8080);
    let greeting = net::in_netns(&client.netns, move || -> std::io::Result<String> {
        use std::io::{BufRead as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = std::io::BufReader::new(s.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        s.write_all(b"over ipv6\n")?;
        let mut back = String::new();
        reader.read_line(&mut back)?;
        Ok(line + &back)
    })
    .expect("enter the client pod")
    .unwrap_or_else(|e| format!("error: {e}"));
    assert!(
        greeting.contains(&format!("you are [{client6}]:")) && greeting.ends_with("over ipv6\n"),
        "IPv6 call from {client6} to {dst}: {greeting}"
    );
    let from6 = format!("\"src.addr\":\"[{client6}]:");
    wait_for(
        10,
        "node 1's access-log line for the IPv6 HBONE stream",
        || {
            mesh.log("ztunnel-node1.log").lines().any(|l| {
                l.contains(&from6)
                    && l.contains("\"direction\":\"inbound\"")
                    && l.contains("\"protocol\":\"hbone\"")
                    && l.contains("\"src.identity\":\"spiffe://cluster.local/ns/demo/sa/client\"")
            })
        },
        || mesh.log("ztunnel-node1.log"),
    );
    // `ambitctl upgrade` replaces node1's ztunnel (the server side) live: every call keeps
    // succeeding, and the old process exits by itself once its connections end.
    let old_pid = node1.ztunnel.as_ref().expect("node1's ztunnel").pid;
    let since = mesh.client_log().lines().count();
    let sd = mesh.state_dir.display().to_string();
    let out = ambitctl(&["upgrade", "node1", "--state-dir", &sd]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && said.contains(&format!("pid {old_pid}")),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{said}");
    let new_pid = mesh
        .state()
        .node("node1")
        .and_then(|n| n.ztunnel.as_ref())
        .expect("node1's new ztunnel")
        .pid;
    assert_ne!(new_pid, old_pid);
    wait_for(
        30,
        "the previous ztunnel to exit once its connections ended",
        || !procs::alive(old_pid),
        || mesh.log("ztunnel-node1.log"),
    );
    wait_for(
        30,
        "replies through the new ztunnel",
        || {
            let log = mesh.client_log();
            ok_results(&log.lines().skip(since).collect::<Vec<_>>().join("\n")) >= 3
        },
        || mesh.client_log(),
    );
    let during: Vec<String> = mesh
        .client_log()
        .lines()
        .skip(since)
        .filter(|l| l.contains("\"ok\":false"))
        .map(str::to_owned)
        .collect();
    assert!(
        during.is_empty(),
        "calls failed during the upgrade: {during:?}"
    );

    // UDP between the sample pods is meshed too (`up` captures the pod networks' UDP, and the
    // upgraded ztunnel was given the same networks): a datagram from the client to the echo
    // pod over each family comes back, the echo pod sees the client's own addresses, and
    // node 1's ztunnel counts the flows it received over CONNECT-UDP from the client.
    let udp_echo = net::in_netns(&echo.netns, || std::net::UdpSocket::bind("[::]:9090"))
        .expect("enter the echo pod")
        .expect("bind UDP in the echo pod");
    udp_echo
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("UDP read timeout");
    let udp_server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1500];
        while seen.len() < 2 {
            let Ok((n, from)) = udp_echo.recv_from(&mut buf) else {
                break;
            };
            let _ = udp_echo.send_to(&[b"re:", &buf[..n]].concat(), from);
            seen.push(from.ip().to_canonical());
        }
        seen
    });
    for dst in [
        SocketAddr::new(echo.ip.into(), 9090),
        SocketAddr::new(echo6.into(), 9090),
    ] {
        let reply = net::in_netns(&client.netns, move || -> std::io::Result<Vec<u8>> {
            let any = if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let socket = std::net::UdpSocket::bind(any)?;
            socket.connect(dst)?;
            socket.set_read_timeout(Some(Duration::from_secs(10)))?;
            socket.send(b"udp through the mesh")?;
            let mut buf = [0u8; 1500];
            let n = socket.recv(&mut buf)?;
            Ok(buf[..n].to_vec())
        })
        .expect("enter the client pod");
        assert!(
            matches!(&reply, Ok(r) if r == b"re:udp through the mesh"),
            "UDP to {dst}: {reply:?}"
        );
    }
    let seen = udp_server.join().expect("the UDP echo thread");
    assert_eq!(
        seen,
        [std::net::IpAddr::from(client.ip), client6.into()],
        "the echo pod saw other sources"
    );
    let body = metrics();
    let udp_flows = body
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("request_protocol=\"udp\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .unwrap_or_else(|| panic!("no UDP flow counted on node 1:\n{body}"));
    assert!(udp_flows.ends_with(" 2"), "{udp_flows}");

    // A deny policy dropped into the watched folder takes effect live.
    std::fs::write(
        state.objects_dir.join("deny.yaml"),
        "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: demo}\nspec:\n  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]\n",
    )
    .expect("write policy");
    let refused_since = mesh.client_log().lines().count();
    wait_for(
        30,
        "the client's calls to be refused",
        || {
            let log = mesh.client_log();
            let fresh: Vec<&str> = log.lines().skip(refused_since).collect();
            fresh.len() >= 2
                && fresh
                    .iter()
                    .rev()
                    .take(2)
                    .all(|l| l.contains("\"ok\":false"))
        },
        || mesh.client_log(),
    );
    let server_log = mesh.log("ztunnel-node1.log");
    assert!(
        server_log
            .lines()
            .any(|l| l.contains("\"outcome\":\"refused\"")
                && l.contains("demo/deny-client")
                && l.contains("\"src.identity\":\"spiffe://cluster.local/ns/demo/sa/client\"")),
        "no access-log line naming the policy:\n{server_log}"
    );

    // Down: nothing left.
    let state = mesh.state();
    let pids: Vec<i32> = state
        .controller
        .iter()
        .chain(state.nodes.iter().filter_map(|n| n.ztunnel.as_ref()))
        .chain(state.pods.iter().filter_map(|p| p.process.as_ref()))
        .map(|p| p.pid)
        .collect();
    assert_eq!(
        pids.len(),
        1 + 2 + 2,
        "controller, 2 ztunnels, 2 sample processes"
    );
    let out = mesh.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<String> = net::list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&format!("{}-", mesh.prefix)))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    for pid in pids {
        assert!(
            !procs::alive(pid),
            "pid {pid} still runs: {}",
            procs::cmdline(pid)
        );
    }
    assert!(
        !mesh.state_dir.exists(),
        "{} left",
        mesh.state_dir.display()
    );
    let new_links: Vec<String> = host_links().difference(&links_before).cloned().collect();
    assert!(
        new_links.is_empty(),
        "links added in the host namespace: {new_links:?}"
    );
    assert_eq!(
        host_iptables(),
        iptables_before,
        "the host's iptables changed"
    );
}

#[test]
fn bad_input_is_named_and_the_mesh_keeps_running() {
    let Some(mesh) = Mesh::up("local_mesh_bad_input", "bad", "1") else {
        return;
    };
    let state = mesh.state();
    wait_for(
        40,
        "the sample client to get replies",
        || ok_results(&mesh.client_log()) > 0,
        || mesh.client_log(),
    );
    let sd = mesh.state_dir.display().to_string();
    // The user's files live outside the state dir (down removes only what it made).
    let scratch = mesh.state_dir.with_extension("inputs");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let cases = [
        ("malformed.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: [oops\n", "document 1"),
        ("gizmo.yaml", "apiVersion: v1\nkind: Gizmo\nmetadata: {name: g, namespace: demo}\n", "unknown kind v1/Gizmo"),
        (
            "nowhere.yaml",
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: s, namespace: nowhere}\n",
            "namespace \"nowhere\", which does not exist",
        ),
        (
            "typo.yaml",
            "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec: {action: DENY, rules: [{from: [{source: {principal: [x]}}]}]}\n",
            "unknown field",
        ),
    ];
    for (name, text, expect) in cases {
        let file = scratch.join(name);
        std::fs::write(&file, text).expect("write");
        let path = file.display().to_string();
        let out = ambitctl(&["apply", "--state-dir", &sd, "-f", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(
            stderr.contains(&path) && stderr.contains(expect),
            "{name}: {stderr}"
        );
        assert!(
            !state.objects_dir.join(name).exists(),
            "{name} was copied anyway"
        );
    }
    std::fs::remove_dir_all(&scratch).expect("remove the inputs dir");

    // The same mistake written straight into the folder: the controller names it in its log.
    std::fs::write(
        state.objects_dir.join("gizmo.yaml"),
        "apiVersion: v1\nkind: Gizmo\nmetadata: {name: g, namespace: demo}\n",
    )
    .expect("write");
    wait_for(
        20,
        "the controller to report the bad file",
        || {
            let log = mesh.log("controller.log");
            log.contains("gizmo.yaml") && log.contains("unknown kind")
        },
        || mesh.log("controller.log"),
    );

    // And the mesh keeps carrying traffic.
    let before = ok_results(&mesh.client_log());
    wait_for(
        20,
        "more successful calls after the bad input",
        || ok_results(&mesh.client_log()) >= before + 3,
        || mesh.client_log(),
    );
}

#[test]
fn enrolling_a_namespace_is_live_and_down_cleans_up_without_a_record() {
    // 2 nodes x 2 pods: echo-1 and echo-2 on node1; client-1 and legacy-client-1 on node2.
    let Some(mesh) = Mesh::up("local_mesh_enroll", "enrl", "2") else {
        return;
    };
    let state = mesh.state();
    // Plaintext names no identity, only the workload its address belongs to (marked as
    // such); over HBONE the certificate proves legacy's identity.
    let legacy_inbound = |protocol: &str| {
        let log = mesh.log("ztunnel-node1.log");
        let who = match protocol {
            "tcp" => [
                "\"src.workload_by_ip\":\"legacy/legacy-client-1\"",
                "\"src.identity\":\"unknown\"",
            ],
            _ => [
                "\"src.workload\":\"legacy/legacy-client-1\"",
                "\"src.identity\":\"spiffe://cluster.local/ns/legacy/sa/default\"",
            ],
        };
        log.lines().any(|l| {
            who.iter().all(|w| l.contains(w))
                && l.contains("\"direction\":\"inbound\"")
                && l.contains(&format!("\"protocol\":\"{protocol}\""))
                && l.contains("\"outcome\":\"ok\"")
        })
    };
    wait_for(
        40,
        "legacy's plaintext calls into the mesh",
        || legacy_inbound("tcp"),
        || mesh.log("ztunnel-node1.log"),
    );
    // Label legacy for the mesh in the watched folder: its pod is captured without a restart
    // and its calls now arrive over HBONE.
    let ns_file = state.objects_dir.join("00-namespaces.yaml");
    let text = std::fs::read_to_string(&ns_file).expect("read namespaces");
    let enrolled = text.replace(
        "name: legacy\n",
        "name: legacy\n  labels:\n    ambit.dev/dataplane-mode: ambient\n",
    );
    assert_ne!(text, enrolled, "legacy not found in {text}");
    std::fs::write(&ns_file, enrolled).expect("write namespaces");
    wait_for(
        30,
        "legacy's calls over HBONE",
        || legacy_inbound("hbone"),
        || mesh.log("ztunnel-node1.log"),
    );

    // A crash that lost the record: down still finds our namespaces and their processes.
    let pids: Vec<i32> = state
        .pods
        .iter()
        .filter_map(|p| p.process.as_ref())
        .chain(state.controller.iter())
        .map(|p| p.pid)
        .collect();
    std::fs::remove_file(mesh.state_dir.join("cluster.json")).expect("remove cluster.json");
    let out = mesh.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<String> = net::list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&format!("{}-", mesh.prefix)))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    for pid in pids {
        assert!(
            !procs::alive(pid),
            "pid {pid} still runs: {}",
            procs::cmdline(pid)
        );
    }
    assert!(
        !mesh.state_dir.exists(),
        "{} left",
        mesh.state_dir.display()
    );
}

/// A folder with a waypoint: `shop` is enrolled; service `api` (on node2) uses Gateway
/// `waypoint`, whose pod runs on node1 beside a client pod; the waypoint denies DELETE.
const WAYPOINT_OBJECTS: &str = include_str!("../../cli/examples/waypoint/shop.yaml");

#[test]
fn a_waypoint_in_the_folder_is_started_and_applies_l7_policy() {
    let objects = tempfile_dir("lm-waypoint-objects");
    std::fs::write(objects.join("shop.yaml"), WAYPOINT_OBJECTS).expect("write objects");
    let od = objects.display().to_string();
    let Some(mesh) = Mesh::up_with(
        "a_waypoint_in_the_folder_is_started_and_applies_l7_policy",
        "w",
        &["--objects", &od],
    ) else {
        return;
    };
    let [client, api, wp] = mesh.pods(["client-0", "api-0", "waypoint-0"]);
    let wp_proc = wp.process.clone().expect("the waypoint was started");
    assert!(procs::alive(wp_proc.pid));
    http_echo_in(&api.netns, SocketAddr::from((api.ip, 8080)));

    let vip: SocketAddr = "10.96.0.30:80".parse().expect("vip");
    let waypoint_log = || mesh.log("waypoint-shop-waypoint.log");
    // The waypoint learns its services from the controller shortly after it starts.
    let last = std::cell::RefCell::new(String::new());
    wait_for(
        30,
        "a GET through the waypoint",
        || {
            let answer = http_from(&client.netns, vip, "GET");
            let ok = answer.starts_with("HTTP/1.1 200");
            *last.borrow_mut() = answer;
            ok
        },
        || {
            format!(
                "last answer: {}\nwaypoint log:\n{}",
                last.borrow(),
                waypoint_log()
            )
        },
    );
    let ok = last.into_inner();
    // Only the waypoint adds the caller's verified identity.
    assert!(
        ok.contains("x-ambit-peer-identity: spiffe://cluster.local/ns/shop/sa/client"),
        "{ok}"
    );
    let denied = http_from(&client.netns, vip, "DELETE");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied.ends_with("RBAC: access denied by shop/no-delete\n"),
        "{denied}"
    );

    // Its metrics say who called which service, with which outcome.
    let (code, metrics) = admin::get(&wp.netns, SocketAddr::from((wp.ip, 15020)), "/metrics")
        .expect("waypoint metrics");
    assert_eq!(code, 200);
    for code in ["200", "403"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                    && l.contains("destination_service=\"api.shop.svc.cluster.local\"")
                    && l.contains(&format!("response_code=\"{code}\""))),
            "no {code} request in the waypoint's metrics:\n{metrics}"
        );
    }
    assert!(
        waypoint_log().contains("\"status\":\"403\""),
        "{}",
        waypoint_log()
    );
    // `ambitctl status` lists it, ready.
    let sd = mesh.state_dir.display().to_string();
    let out = ambitctl(&["status", "-o", "json", "--state-dir", &sd]);
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status -o json is JSON");
    assert_eq!(
        status["waypoints"][0]["gateway"], "shop/waypoint",
        "{status:#}"
    );
    assert_eq!(status["waypoints"][0]["ready"], true, "{status:#}");

    // `ambitctl check` on this healthy mesh (with its waypoint): every check passes.
    let check = || {
        let out = ambitctl(&["check", "--state-dir", &sd]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, text, stderr) = check();
    assert!(ok, "{text}\n{stderr}");
    for line in [
        "ok      objects folder",
        "ok      controller",
        "ok      ztunnel on node1",
        "ok      ztunnel on node2",
        "ok      ztunnel on node2 -> controller",
        "ok      certificate spiffe://cluster.local/ns/shop/sa/",
        "ok      waypoint shop/waypoint",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    assert!(text.contains(", 0 failed"), "{text}");

    // `status` and `proxy-config --kubernetes` read the same ztunnels, controller and waypoint
    // through an API server's port-forward (the fake one, forwarding into the namespaces as a
    // kubelet forwards into pods) and print what the local commands print.
    same_output_through_the_api_server(&mesh);

    // A ztunnel stopped: check names it, says how to start one, and fails.
    let node2 = mesh.state().node("node2").expect("node2").clone();
    let z2 = node2.ztunnel.clone().expect("node2's ztunnel");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(z2.pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for(
        10,
        "node2's ztunnel to exit",
        || !procs::alive(z2.pid),
        String::new,
    );
    let (ok, text, stderr) = check();
    assert!(!ok, "{text}");
    assert!(stderr.contains("1 of "), "{stderr}");
    let fail = format!(
        "FAIL ztunnel on node2: not running (pid {} is gone): pods on node2 are refused, not let through\n  fix: start a new one: `ambitctl upgrade node2 --state-dir {sd}`",
        z2.pid
    );
    assert!(text.contains(&fail), "{fail:?} missing:\n{text}");
    assert!(text.contains("ok      ztunnel on node1"), "{text}");

    // The fix it names works: after it, every check passes again.
    let out = ambitctl(&["upgrade", "node2", "--state-dir", &sd]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        30,
        "check to pass after the named fix",
        || check().0,
        || check().1,
    );

    let out = mesh.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!procs::alive(wp_proc.pid), "the waypoint outlived down");
    let _ = std::fs::remove_dir_all(&objects);
}

/// A pod the folder gains while the mesh runs: in enrolled `demo`, on node2, whose app's very
/// first action is a call to echo-1's own address (10.77.1.2:8080), which would succeed in
/// plaintext if the pod were not captured yet.
const LATE_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: late-1\n  namespace: demo\n  labels: {app: client}\n  annotations: {ambit.dev/sample-client: \"10.77.1.2:8080\"}\nspec:\n  nodeName: node2\n  serviceAccountName: client\n  containers: [{name: app, image: ambitctl-sample}]\nstatus:\n  podIP: 10.77.2.3\n  podIPs: [{ip: 10.77.2.3}, {ip: \"fd77:2::3\"}]\n";

/// The lines of `log` after the first `skip`.
fn lines_after(log: &str, skip: usize) -> Vec<String> {
    log.lines().skip(skip).map(str::to_owned).collect()
}

#[test]
fn pods_are_made_through_the_cni_chain_captured_before_their_app_runs_and_delete_runs_del() {
    let Some(mesh) = Mesh::up("local_mesh_cni", "cni", "1") else {
        return;
    };
    let state = mesh.state();
    let sd = mesh.state_dir.display().to_string();
    let node2 = state.node("node2").expect("node2").clone();
    let ipam = mesh.state_dir.join("cni/node2/ipam/ambit-local");
    let reserved = |ip: &str| ipam.join(ip).exists();
    // client-1 was made by the chain: host-local reserved its address (and its IPv6 twin),
    // bridge put it on node2's cni0, which holds the gateway.
    assert!(
        reserved("10.77.2.2") && reserved("fd77:2::2"),
        "{}",
        ipam.display()
    );
    let bridge = net::ip(&node2.netns, &["-o", "addr", "show", "dev", "cni0"]).expect("cni0");
    assert!(bridge.contains("10.77.2.1/24"), "{bridge}");
    let veths = || {
        net::ip(&node2.netns, &["-o", "link", "show", "master", "cni0"])
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(veths(), 1, "one pod on node2's bridge");

    // The folder gains late-1; the node makes it: sandbox, CNI ADD, then its app, which
    // calls at once. No byte of it may cross the fabric in plaintext.
    let scratch = mesh.state_dir.with_extension("late");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let file = scratch.join("late.yaml");
    std::fs::write(&file, LATE_POD).expect("write late.yaml");
    let out = ambitctl(&[
        "apply",
        "--state-dir",
        &sd,
        "-f",
        &file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&scratch).expect("remove scratch");
    let sniffer = ambit_tests::ztunnel::Sniffer::start(&state.fabric).expect("sniffer");
    let late_log = || mesh.log("sample-demo-late-1.log");
    let node1_log = || mesh.log("ztunnel-node1.log");
    let from_late = |log: &str, skip: usize| -> Vec<String> {
        lines_after(log, skip)
            .into_iter()
            .filter(|l| {
                l.contains("\"src.addr\":\"10.77.2.3:") && l.contains("\"direction\":\"inbound\"")
            })
            .collect()
    };
    for round in ["created", "created again"] {
        let node1_since = node1_log().lines().count();
        let late_since = late_log().lines().count();
        let out = ambitctl(&["pod", "create", "demo/late-1", "--state-dir", &sd]);
        assert!(
            out.status.success(),
            "pod create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pod = mesh
            .state()
            .pods
            .into_iter()
            .find(|p| p.name == "late-1")
            .expect("late-1 recorded");
        assert_eq!(pod.ip.to_string(), "10.77.2.3");
        assert!(
            reserved("10.77.2.3") && reserved("fd77:2::3"),
            "{round}: not reserved"
        );
        let rules = net::exec_in(&pod.netns, &["iptables-save"]).expect("iptables-save");
        assert!(
            rules.contains("AMBIT_V1_"),
            "{round}: no capture rules:\n{rules}"
        );
        wait_for(
            30,
            &format!("late-1 ({round}) to be answered 3 times"),
            || ok_results(&lines_after(&late_log(), late_since).join("\n")) >= 3,
            || late_log() + &mesh.log("ztunnel-node2.log"),
        );
        // Every call that reached echo-1 came over HBONE with late-1's proven identity; a
        // call made before ztunnel served the pod was refused, never carried in plaintext.
        let inbound = from_late(&node1_log(), node1_since);
        assert!(
            !inbound.is_empty(),
            "{round}: node1 logged nothing from late-1"
        );
        for line in &inbound {
            assert!(
                line.contains("\"protocol\":\"hbone\"")
                    && line
                        .contains("\"src.identity\":\"spiffe://cluster.local/ns/demo/sa/client\""),
                "{round}: not HBONE: {line}"
            );
        }
        let failed: Vec<String> = lines_after(&late_log(), late_since)
            .into_iter()
            .filter(|l| l.contains("\"ok\":false"))
            .collect();
        eprintln!(
            "{round}: {} call(s) refused before ztunnel served late-1: {failed:?}",
            failed.len()
        );

        // Deleted: its app stops, DEL runs through the chain (ambit-cni tells ztunnel and
        // removes the rules, bridge the veth, host-local the addresses), its namespace goes.
        let removed_before = mesh
            .log("ztunnel-node2.log")
            .matches("cni: pod removed")
            .count();
        let out = ambitctl(&["pod", "delete", "demo/late-1", "--state-dir", &sd]);
        assert!(
            out.status.success(),
            "pod delete: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let app = pod.process.as_ref().expect("late-1's app").pid;
        assert!(!procs::alive(app), "late-1's app outlived its pod");
        assert!(
            !reserved("10.77.2.3") && !reserved("fd77:2::3"),
            "{round}: host-local still holds late-1's addresses"
        );
        assert!(reserved("10.77.2.2"), "client-1's address was released too");
        assert_eq!(veths(), 1, "{round}: late-1's veth is still on cni0");
        let removed = mesh.log("ztunnel-node2.log");
        assert!(
            removed.matches("cni: pod removed").count() > removed_before,
            "{round}: ztunnel was not told of the DEL"
        );
        assert!(
            !net::list_netns().expect("netns list").contains(&pod.netns),
            "{round}: late-1's namespace is left"
        );
        assert!(mesh.state().pods.iter().all(|p| p.name != "late-1"));
    }
    // The second time the same pod (same uid and address) came in a new namespace: node2's
    // ztunnel moved to it rather than keep serving the dead one.
    assert!(
        mesh.log("ztunnel-node2.log")
            .contains("pod's sandbox replaced; serving its new namespace"),
        "{}",
        mesh.log("ztunnel-node2.log")
    );
    let seen = sniffer.bytes();
    assert!(
        !ambit_tests::ztunnel::contains(&seen, b"you are 10.77.2.3"),
        "late-1's exchange crossed the fabric in plaintext"
    );
    assert!(!seen.is_empty(), "the sniffer saw nothing on the fabric");

    // Down runs DEL for the pods it removes.
    let out = mesh.down();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pod in ["demo/echo-1", "demo/client-1"] {
        assert!(
            said.contains(&format!("released pod {pod} (CNI DEL")),
            "{said}"
        );
    }
}

/// The words of each line of `text` from the first line starting with `from`, with durations
/// like `23h59m` (which tick between two reads) masked.
fn comparable(text: &str, from: &str) -> Vec<String> {
    let is_duration = |w: &str| {
        w.strip_suffix('m')
            .and_then(|w| w.split_once('h'))
            .is_some_and(|(h, m)| {
                !h.is_empty() && h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())
            })
    };
    text.lines()
        .skip_while(|l| !l.starts_with(from))
        .map(|l| {
            l.split_whitespace()
                .map(|w| if is_duration(w) { "*" } else { w })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A dial into `netns` to `ip:port`, as the fake API server's port-forward makes it.
fn dial_into(netns: String, ip: std::net::IpAddr) -> ambit_testing::apiserver::PodDialer {
    std::sync::Arc::new(move |port| {
        let addr = SocketAddr::new(ip, port);
        net::in_netns(&netns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .map_err(std::io::Error::other)?
    })
}

fn same_output_through_the_api_server(mesh: &Mesh) {
    use ambit_testing::apiserver::FakeApiServer;
    use serde_json::json;

    let state = mesh.state();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let server = rt
        .block_on(FakeApiServer::start())
        .expect("fake API server");
    let apply = |v: serde_json::Value| {
        server.apply(&v).expect("write to the fake API server");
    };
    let pod = |ns: &str, name: &str, labels: serde_json::Value, node: &str, ip: String| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "hostIP": ip, "podIP": ip},
        })
    };
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    for ns in ["ambit-system", "shop"] {
        apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }
    apply(pod(
        "ambit-system",
        "ambit-controller-0",
        json!({"app.kubernetes.io/name": "ambit-controller"}),
        "node1",
        net::FABRIC_IP.to_string(),
    ));
    server.forward_pod(
        "ambit-system",
        "ambit-controller-0",
        dial_into(state.fabric.clone(), net::FABRIC_IP.into()),
    );
    for node in &state.nodes {
        apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}));
        let name = format!("ambit-ztunnel-{}", node.name);
        apply(pod(
            "ambit-system",
            &name,
            json!({"app.kubernetes.io/name": "ambit-ztunnel"}),
            &node.name,
            node.ip.to_string(),
        ));
        server.forward_pod(
            "ambit-system",
            &name,
            dial_into(node.netns.clone(), loopback),
        );
    }
    let [wp] = mesh.pods(["waypoint-0"]);
    apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"gatewayClassName": "ambit-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }));
    apply(pod(
        "shop",
        "waypoint-0",
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}),
        &wp.node,
        wp.ip.to_string(),
    ));
    server.forward_pod("shop", "waypoint-0", dial_into(wp.netns.clone(), loopback));

    let kubeconfig = mesh.state_dir.join("kubeconfig");
    server
        .write_kubeconfig(&kubeconfig, None)
        .expect("kubeconfig");
    let kc = kubeconfig.display().to_string();
    let sd = mesh.state_dir.display().to_string();
    let run = |args: &[&str]| {
        let out = ambitctl(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ambitctl {args:?}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let local = run(&["status", "--state-dir", &sd]);
    let kube = run(&["status", "--kubernetes", "--kubeconfig", &kc]);
    assert!(kube.contains("connected ztunnels 2,"), "{kube}");
    assert!(
        kube.contains("pod ambit-system/ambit-controller-0"),
        "{kube}"
    );
    let tables = comparable(&kube, "NODE");
    assert_eq!(
        tables,
        comparable(&local, "NODE"),
        "local:\n{local}\nkubernetes:\n{kube}"
    );
    assert!(
        tables
            .iter()
            .any(|l| l.starts_with("shop/waypoint waypoint-0")
                || l.starts_with("shop/waypoint shop/waypoint-0")),
        "{kube}"
    );
    assert!(tables.iter().any(|l| l.starts_with("node2 ")), "{kube}");

    let local = run(&["proxy-config", "node1", "--state-dir", &sd]);
    let kube = run(&["proxy-config", "node1", "--kubernetes", "--kubeconfig", &kc]);
    assert!(
        kube.starts_with("ztunnel on node1 (ambit-system/ambit-ztunnel-node1)"),
        "{kube}"
    );
    let body = comparable(&kube, "WORKLOADS");
    assert!(body.iter().any(|l| l.starts_with("shop api-0 ")), "{kube}");
    assert_eq!(
        body,
        comparable(&local, "WORKLOADS"),
        "local:\n{local}\nkubernetes:\n{kube}"
    );

    // `explain` on the cluster: the same proxies' config dumps through port-forward and their
    // access-log events from the pods' logs (the fake API server serves the proxies' real log
    // files as a kubelet serves container logs) give the same walk as the local mesh.
    for node in &state.nodes {
        let log = mesh
            .state_dir
            .join("logs")
            .join(format!("ztunnel-{}.log", node.name));
        server.pod_log(
            "ambit-system",
            &format!("ambit-ztunnel-{}", node.name),
            std::sync::Arc::new(move || std::fs::read_to_string(&log)),
        );
    }
    let wp_log = mesh
        .state_dir
        .join("logs")
        .join("waypoint-shop-waypoint.log");
    server.pod_log(
        "shop",
        "waypoint-0",
        std::sync::Arc::new(move || std::fs::read_to_string(&wp_log)),
    );
    let query = [
        "explain",
        "shop/client-0",
        "api.shop",
        "--port",
        "80",
        "--method",
        "DELETE",
    ];
    let local = run(&[&query[..], &["--state-dir", sd.as_str()][..]].concat());
    let kube = run(&[
        &query[..],
        &["--kubernetes", "--kubeconfig", kc.as_str()][..],
    ]
    .concat());
    let walk = |t: &str| {
        t.split("\nlast access-log events")
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(walk(&kube).contains("DENIED"), "{kube}");
    assert!(walk(&kube).contains("shop/no-delete"), "{kube}");
    assert_eq!(
        walk(&kube),
        walk(&local),
        "local:\n{local}\nkubernetes:\n{kube}"
    );
    // The DELETE this test sent is among the waypoint's events, read from its pod's log.
    let events = kube
        .split("last access-log events of waypoint shop/waypoint")
        .nth(1)
        .unwrap_or_default();
    assert!(
        events.contains("method=DELETE") && events.contains("status=403"),
        "{kube}"
    );
    assert!(!kube.contains("(unreadable"), "{kube}");

    // A pod whose port cannot be reached is reported, not hung on.
    let out = ambitctl(&["proxy-config", "node3", "--kubernetes", "--kubeconfig", &kc]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no ztunnel pod on node \"node3\""), "{err}");
    drop(server);
    rt.shutdown_background();
}
