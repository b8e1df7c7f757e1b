//! `ambit-cni` invoked exactly as a container runtime invokes a CNI chain: environment
//! variables and the network configuration on stdin, `loopback`, then Debian's `bridge` with
//! `host-local` (containernetworking-plugins in /usr/lib/cni) giving the pod its interface and
//! address in a fresh network namespace, then `ambit-cni` with the bridge's result as
//! `prevResult`. ztunnels run in-process beside, with a sniffer on the fabric.
//!
//! - A pod created in an enrolled namespace whose app connects at once: with its node's ztunnel
//!   down, every connection is refused (the plugin found the pod in ztunnel's kept state and
//!   installed the rules before the app ran) until ztunnel starts and adopts it; with ztunnel
//!   up, it is adopted at once. Never a plaintext byte on the fabric; then HBONE.
//! - Malformed calls (bad JSON, a missing variable, an unsupported version, no prevResult), a
//!   missing namespace, repeated ADD and DEL: the spec's error objects and codes, and no rules
//!   left behind. VERSION lists the supported versions.
//!
//! Needs root.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{exec_in, Pod, ReplyServer, Topology};
use ambit_ztunnel::node_dir::NodeDir;
use ambit_ztunnel::state::static_file;
use ambitctl::local::cni;
use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Debian's containernetworking-plugins.
const CNI_PLUGINS: &str = "/usr/lib/cni";
/// Every payload a client sends starts with this; the fabric must never show it.
const MARKER: &[u8] = b"CNI-FIRST-PACKET-";

/// The result of one plugin call: exit success, stdout parsed as JSON (if any), stderr.
#[derive(Debug)]
struct Call {
    ok: bool,
    out: Option<Value>,
    stderr: String,
}

/// Writes the configuration to the plugin's stdin. A plugin that fails on its environment
/// exits before reading it: a broken pipe then is its answer, not the test's failure.
fn feed(pipe: Option<std::process::ChildStdin>, stdin: &[u8]) -> anyhow::Result<()> {
    match pipe.map(|mut p| p.write_all(stdin)) {
        Some(Err(e)) if e.kind() != ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A network namespace made as a runtime makes a pod sandbox's, deleted on drop.
struct Sandbox {
    name: String,
    link: Option<PathBuf>,
}

impl Sandbox {
    fn new(name: &str) -> anyhow::Result<Self> {
        ambitctl::local::net::add_netns(name)?;
        Ok(Sandbox {
            name: name.to_owned(),
            link: None,
        })
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Publishes it in the directory ztunnel scans (on a node: /var/run/netns itself).
    fn publish(&mut self, dir: &Path) -> anyhow::Result<()> {
        let link = dir.join(&self.name);
        std::os::unix::fs::symlink(self.path(), &link)?;
        self.link = Some(link);
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
        let _ = ambitctl::local::net::del_netns(&self.name);
    }
}

fn ambit_entry(data_dir: &Path, node: &str) -> Value {
    json!({"type": "ambit-cni", "dataDir": data_dir, "nodeName": node, "timeoutMs": 3000})
}

/// loopback, bridge (cni0, the gateway 10.77.1.129 in the node) with host-local handing out
/// 10.77.1.130 and up (inside node 1's 10.77.1.0/24, which the other node routes to it), then
/// ambit-cni; run from inside node 1's namespace by the same runtime side as the local mesh's
/// (`ambitctl::local::cni::Chain`).
fn node_chain(node_netns: &str, ipam_dir: &Path, data_dir: &Path) -> cni::Chain {
    let ambit_cni = ambit_tests::workspace_bin("ambit-cni");
    cni::Chain {
        node_netns: node_netns.to_owned(),
        conflist: json!({
            "cniVersion": "1.0.0",
            "name": "ambit-test",
            "plugins": [
                {"type": "loopback"},
                {
                    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": ipam_dir,
                        "ranges": [[{"subnet": "10.77.1.128/25", "rangeStart": "10.77.1.130",
                                     "rangeEnd": "10.77.1.140", "gateway": "10.77.1.129"}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                ambit_entry(data_dir, "n1"),
            ]
        }),
        path: vec![
            ambit_cni.parent().unwrap_or(Path::new(".")).to_path_buf(),
            PathBuf::from(CNI_PLUGINS),
        ],
    }
}

/// How the runtime describes pod `namespace/name` in `sandbox` to the chain (no address
/// requested: host-local picks the next one).
fn pod_in(sandbox: &Sandbox, namespace: &str, name: &str) -> cni::Sandbox {
    cni::Sandbox {
        container_id: format!("ctr-{}", sandbox.name),
        netns: sandbox.path(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: format!("k8s-uid-{name}"),
        ips: Vec::new(),
    }
}

fn k8s_args(ns: &str, name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=k8s-uid-{name}")
}

/// The pod address in a CNI result.
fn result_ip(result: &Value) -> anyhow::Result<Ipv4Addr> {
    let raw = result["ips"][0]["address"]
        .as_str()
        .context("no ips in the result")?;
    Ok(raw.split('/').next().unwrap_or("").parse()?)
}

/// How one connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Greeting and echo came back.
    Ok,
    /// The connect was refused (RST to the SYN).
    Refused,
    /// Anything else: connected then closed, or no answer.
    Other,
}

/// One connection from `netns` to `dst`, the payload written before anything is read.
fn attempt(netns: &str, dst: SocketAddr, payload: Vec<u8>) -> Outcome {
    let timeout = Duration::from_secs(1);
    let connected = ambit_tests::in_netns(netns, move || TcpStream::connect_timeout(&dst, timeout));
    let mut s = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        _ => return Outcome::Other,
    };
    let _ = s.set_read_timeout(Some(timeout));
    if s.write_all(&payload).is_err() {
        return Outcome::Other;
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    while !reply.ends_with(&payload) {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => reply.extend_from_slice(&buf[..n]),
            _ => return Outcome::Other,
        }
    }
    if reply.starts_with(b"local=") {
        Outcome::Ok
    } else {
        Outcome::Other
    }
}

/// Connects from `netns` every 20 ms until one succeeds; returns every outcome and how long
/// it took from the first attempt.
fn connect_until_ok(
    netns: &str,
    dst: SocketAddr,
    tag: &str,
) -> anyhow::Result<(Vec<Outcome>, Duration)> {
    let start = Instant::now();
    let mut seen = Vec::new();
    for n in 0.. {
        let outcome = attempt(
            netns,
            dst,
            [MARKER, format!("{tag}-{n}").as_bytes()].concat(),
        );
        seen.push(outcome);
        if outcome == Outcome::Ok {
            return Ok((seen, start.elapsed()));
        }
        if start.elapsed() > WAIT {
            bail!("{tag}: never served: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!()
}

fn rules_in(netns: &str) -> anyhow::Result<String> {
    exec_in(netns, &["iptables-save"])
}

/// The ztunnel state of this topology, as YAML, and written as n1's kept state (what n1's
/// ztunnel acknowledged before it went down).
fn state_yaml(srv: &Pod, plain: &Pod, plain_srv: &Pod, early: Ipv4Addr, late: Ipv4Addr) -> String {
    let pod_at = |name: &str, ip: Ipv4Addr| Pod {
        name: name.to_owned(),
        netns: String::new(),
        ip,
        ip6: std::net::Ipv6Addr::UNSPECIFIED,
        node_netns: String::new(),
    };
    format!(
        "workloads:\n{}{}{}{}{}",
        workload(srv, "shop", "srv", "n2", true),
        workload(&pod_at("early", early), "shop", "early", "n1", true),
        workload(&pod_at("late", late), "shop", "late", "n1", true),
        workload(plain, "legacy", "default", "n1", false),
        workload(plain_srv, "legacy", "default", "n2", false),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_in_an_enrolled_namespace_is_refused_until_ztunnel_serves_it_then_meshed(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("cni_firstpkt")
        .node("n1")
        .node("n2")
        .pod("srv", "n2")
        .pod("plain", "n1")
        .pod("plain-srv", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (srv, plain, plain_srv) = (
        topo.pod("srv").clone(),
        topo.pod("plain").clone(),
        topo.pod("plain-srv").clone(),
    );
    let work = std::env::temp_dir().join(format!("ambit-{}-cni", topo.prefix()));
    let _ = std::fs::remove_dir_all(&work);
    let (data_n1, data_n2, ipam) = (
        work.join("data-n1"),
        work.join("data-n2"),
        work.join("ipam"),
    );
    std::fs::create_dir_all(&ipam)?;
    let (early_ip, late_ip) = (Ipv4Addr::new(10, 77, 1, 130), Ipv4Addr::new(10, 77, 1, 131));
    let state = state_yaml(&srv, &plain, &plain_srv, early_ip, late_ip);
    let state_file = work.join("state.yaml");
    std::fs::write(&state_file, &state)?;
    // n1's ztunnel acknowledged this state before it went down.
    NodeDir::open(&data_n1, "n1")?.save_state(&static_file::load(&state_file, 1)?)?;

    let app = ReplyServer::start(&srv, 8080)?;
    let plain_app = ReplyServer::start(&plain_srv, 8080)?;
    let ca = TestCa::new(Duration::from_secs(3600));
    let n2 = Mesh::start(&topo, &["n2"], &state, ca.clone(), |_, c| {
        c.data_dir = Some(data_n2.clone());
    })
    .await?;
    n2.wait_enrolled("n2", &uid("shop", &srv), true).await?;
    let fabric = topo.namespaces()[0].clone();
    let sniffer = Sniffer::start(&fabric)?;
    let chain = node_chain(&topo.node("n1").netns, &ipam, &data_n1);
    let prefix = topo.prefix().to_owned();
    let netns_dir = topo.netns_dir().to_path_buf();

    // 1. n1's ztunnel is down. The pod is created and its app connects at once.
    let (mut early, early_result, outage) = blocking({
        let (chain, prefix, dst) = (chain.clone(), prefix.clone(), app.addr());
        move || {
            let early = Sandbox::new(&format!("{prefix}-early"))?;
            let result = chain.add(&pod_in(&early, "shop", "early"), early_ip)?;
            assert_eq!(result_ip(&result)?, early_ip, "host-local's first address");
            let rules = rules_in(&early.name)?;
            assert!(
                rules.contains("AMBIT_V1_"),
                "no capture rules after ADD:\n{rules}"
            );
            let outage: Vec<Outcome> = (0..10)
                .map(|n| {
                    attempt(
                        &early.name,
                        dst,
                        [MARKER, format!("early-{n}").as_bytes()].concat(),
                    )
                })
                .collect();
            Ok((early, result, outage))
        }
    })
    .await?;
    assert!(
        outage.iter().all(|o| *o == Outcome::Refused),
        "with no ztunnel serving it, the new pod's connections must be refused: {outage:?}"
    );
    assert!(
        app.seen().is_empty(),
        "the app got a connection from an unserved pod"
    );

    // ztunnel starts: it finds the pod (the runtime's netns directory) and adopts it.
    early.publish(&netns_dir)?;
    let n1 = Mesh::start(&topo, &["n1"], &state, ca.clone(), |_, c| {
        c.data_dir = Some(data_n1.clone());
    })
    .await?;
    let started = Instant::now();
    let early_name = early.name.clone();
    let dst = app.addr();
    let (tries, _) = blocking(move || connect_until_ok(&early_name, dst, "early-after")).await?;
    eprintln!(
        "pod created while ztunnel was down: served {} ms after ztunnel started ({} attempts)",
        started.elapsed().as_millis(),
        tries.len()
    );
    assert!(
        tries
            .iter()
            .all(|o| matches!(o, Outcome::Ok | Outcome::Refused)),
        "{tries:?}"
    );
    let seen = app.seen();
    assert_eq!(
        seen.last().map(|s| s.peer.ip()),
        Some(early_ip.into()),
        "the app sees the pod's own address"
    );

    // 2. n1's ztunnel is up: the next pod is adopted as the plugin reports it.
    let (late, late_result, tries, took) = blocking({
        let (chain, prefix) = (chain, prefix.clone());
        move || {
            let late = Sandbox::new(&format!("{prefix}-late"))?;
            let result = chain.add(&pod_in(&late, "shop", "late"), late_ip)?;
            let added = Instant::now();
            assert_eq!(result_ip(&result)?, late_ip);
            let (tries, _) = connect_until_ok(&late.name, dst, "late")?;
            Ok((late, result, tries, added.elapsed()))
        }
    })
    .await?;
    eprintln!(
        "pod created with ztunnel up: first served connection {} ms after ADD returned, attempts {tries:?}",
        took.as_millis()
    );
    assert!(
        tries
            .iter()
            .all(|o| matches!(o, Outcome::Ok | Outcome::Refused)),
        "{tries:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "adopting a reported pod took {took:?}"
    );
    n1.wait_enrolled("n1", "shop/late", true).await?;

    // The control: plaintext between pods outside the mesh is visible to the sniffer.
    let control = b"CNI-CONTROL-IN-CLEAR";
    let plain_ns = plain.netns.clone();
    let plain_dst = plain_app.addr();
    let outcome = blocking(move || Ok(attempt(&plain_ns, plain_dst, control.to_vec()))).await?;
    assert_eq!(outcome, Outcome::Ok);
    eventually("the sniffer to see the control", || {
        contains(&sniffer.bytes(), control)
    })
    .await?;
    let wire = sniffer.bytes();
    assert!(contains(&wire, &[0x16, 0x03]), "no TLS on the fabric");
    assert!(
        !contains(&wire, MARKER),
        "a new pod's payload crossed the fabric in plaintext"
    );

    // DEL through the chain: rules gone, ztunnel told; a second DEL (and one after the
    // namespace is gone) still succeeds.
    blocking({
        let chain = node_chain(&topo.node("n1").netns, &ipam, &data_n1);
        move || {
            chain.del(&pod_in(&late, "shop", "late"), Some(&late_result))?;
            assert!(
                !rules_in(&late.name)?.contains("AMBIT_"),
                "rules left after DEL"
            );
            chain.del(&pod_in(&late, "shop", "late"), Some(&late_result))?;
            chain.del(&pod_in(&early, "shop", "early"), Some(&early_result))?;
            drop(early);
            drop(late);
            Ok(())
        }
    })
    .await?;
    n1.shutdown().await;
    n2.shutdown().await;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// One call of ambit-cni alone, from the host, for the error cases.
fn call(env: &[(&str, &str)], stdin: &[u8]) -> anyhow::Result<Call> {
    let mut cmd = Command::new(ambit_tests::workspace_bin("ambit-cni"));
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    feed(child.stdin.take(), stdin)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(Call {
        ok: out.status.success(),
        out: (!text.trim().is_empty())
            .then(|| serde_json::from_str(&text))
            .transpose()
            .with_context(|| format!("non-JSON stdout: {text}"))?,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Asserts the call failed with the spec's error object carrying `code`.
fn assert_error(call: &Call, code: u64, version: &str, what: &str) {
    assert!(!call.ok, "{what}: exited 0: {call:?}");
    let out = call
        .out
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no error object: {call:?}"));
    assert_eq!(out["code"], json!(code), "{what}: {out}");
    assert_eq!(out["cniVersion"], json!(version), "{what}: {out}");
    assert!(
        out["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {out}"
    );
    assert!(out["details"].is_string(), "{what}: {out}");
}

#[test]
fn malformed_calls_missing_namespaces_and_repeats_get_the_specs_answers_and_leave_no_rules(
) -> anyhow::Result<()> {
    if !ambit_tests::require_root("cni_errors") {
        return Ok(());
    }
    let tag = format!("cnierr{:x}", std::process::id() & 0xffff);
    let sandbox = Sandbox::new(&format!("{tag}-pod"))?;
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    // The pod is in the kept state as enrolled; no ztunnel runs, so the plugin decides from it.
    let state = work.path().join("state.yaml");
    std::fs::write(
        &state,
        "workloads:\n  - name: errs\n    namespace: shop\n    serviceAccount: errs\n    node: n1\n    addresses: [10.77.9.9]\n    protocol: HBONE\n  - name: legacy\n    namespace: legacy\n    serviceAccount: default\n    node: n1\n    addresses: [10.77.9.8]\n    protocol: TCP\n",
    )?;
    NodeDir::open(&data, "n1")?.save_state(&static_file::load(&state, 1)?)?;
    let netns = sandbox.path().display().to_string();
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": netns}],
                      "ips": [{"address": "10.77.9.9/32", "interface": 0}]});
    let conf = |version: &str, prev: Option<&Value>| {
        let mut c = ambit_entry(&data, "n1");
        c["cniVersion"] = json!(version);
        c["name"] = json!("k8s");
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        serde_json::to_vec(&c).unwrap_or_default()
    };
    let env = |cmd: &'static str, netns: &str, args: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_owned()),
            ("CNI_CONTAINERID", "ctr-errs".to_owned()),
            ("CNI_NETNS", netns.to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_ARGS", args.to_owned()),
            ("CNI_PATH", CNI_PLUGINS.to_owned()),
        ]
    };
    let run = |env: &[(&'static str, String)], stdin: &[u8]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        call(&env, stdin)
    };
    let args = k8s_args("shop", "errs");
    let no_rules = || -> anyhow::Result<()> {
        let rules = rules_in(&sandbox.name)?;
        assert!(!rules.contains("AMBIT_"), "rules left behind:\n{rules}");
        Ok(())
    };

    // VERSION.
    let v = run(
        &[("CNI_COMMAND", "VERSION".into())],
        br#"{"cniVersion":"1.0.0"}"#,
    )?;
    assert!(v.ok, "{v:?}");
    assert_eq!(
        v.out,
        Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
        )
    );

    // Malformed input: each a spec error, none leaves a rule.
    let add = env("ADD", &netns, &args);
    assert_error(&run(&add, b"{\"cniVersion\": ")?, 6, "1.0.0", "bad JSON");
    let mut missing = add.clone();
    missing.retain(|(k, _)| *k != "CNI_CONTAINERID");
    let c = run(&missing, &conf("1.0.0", Some(&prev)))?;
    assert_error(&c, 4, "1.0.0", "missing CNI_CONTAINERID");
    assert!(c.out.as_ref().is_some_and(|o| o["details"]
        .as_str()
        .unwrap_or("")
        .contains("CNI_CONTAINERID")));
    assert_error(&run(&[], b"")?, 4, "1.0.0", "no CNI_COMMAND");
    assert_error(
        &run(&add, &conf("0.2.0", Some(&prev)))?,
        1,
        "1.0.0",
        "unsupported version",
    );
    assert_error(
        &run(&add, &conf("1.0.0", None))?,
        7,
        "1.0.0",
        "no prevResult",
    );
    let mut bad_args = add.clone();
    bad_args[4].1 = "K8S_POD_NAME".into();
    assert_error(
        &run(&bad_args, &conf("1.0.0", Some(&prev)))?,
        4,
        "1.0.0",
        "bad CNI_ARGS",
    );
    no_rules()?;

    // A missing namespace: ADD and CHECK say the container does not exist; DEL succeeds.
    let gone = format!("/var/run/netns/{tag}-gone");
    assert_error(
        &run(&env("ADD", &gone, &args), &conf("0.4.0", Some(&prev)))?,
        3,
        "0.4.0",
        "ADD, no netns",
    );
    assert_error(
        &run(&env("CHECK", &gone, &args), &conf("1.0.0", Some(&prev)))?,
        3,
        "1.0.0",
        "CHECK, no netns",
    );
    let del_gone = run(&env("DEL", &gone, &args), &conf("1.0.0", Some(&prev)))?;
    assert!(del_gone.ok && del_gone.out.is_none(), "{del_gone:?}");
    let del_none = run(&env("DEL", "", &args), &conf("1.0.0", None))?;
    assert!(del_none.ok, "DEL without CNI_NETNS: {del_none:?}");

    // ADD of the enrolled pod (ztunnel away): rules in, prevResult passed through unchanged.
    let added = run(&add, &conf("1.0.0", Some(&prev)))?;
    assert!(added.ok, "{added:?}");
    assert_eq!(added.out.as_ref(), Some(&prev));
    assert!(added.stderr.contains("kept state"), "{}", added.stderr);
    let once = rules_in(&sandbox.name)?;
    assert!(once.contains("AMBIT_V1_"), "{once}");
    // Repeated: nothing duplicated.
    let again = run(&add, &conf("1.0.0", Some(&prev)))?;
    assert!(again.ok, "{again:?}");
    let twice = rules_in(&sandbox.name)?;
    for jump in ["-A PREROUTING -j AMBIT_PRERT", "-A OUTPUT -j AMBIT_OUTPUT"] {
        assert_eq!(
            once.matches(jump).count(),
            twice.matches(jump).count(),
            "{jump}:\n{twice}"
        );
    }
    assert_eq!(
        twice.matches("-A OUTPUT -j AMBIT_OUTPUT").count(),
        2,
        "mangle and nat, once each:\n{twice}"
    );
    let check = env("CHECK", &netns, &args);
    let ok = run(&check, &conf("1.0.0", Some(&prev)))?;
    assert!(ok.ok && ok.out.is_none(), "{ok:?}");
    assert_error(
        &run(&check, &conf("0.3.1", Some(&prev)))?,
        1,
        "0.3.1",
        "CHECK in 0.3.1",
    );

    // DEL removes them; a second DEL is a no-op; CHECK now reports the pod uncaptured.
    let del = env("DEL", &netns, &args);
    for _ in 0..2 {
        let d = run(&del, &conf("1.0.0", Some(&prev)))?;
        assert!(d.ok && d.out.is_none(), "{d:?}");
        no_rules()?;
    }
    assert_error(
        &run(&check, &conf("1.0.0", Some(&prev)))?,
        101,
        "1.0.0",
        "CHECK, rules gone",
    );

    // A pod outside the mesh is left alone.
    let legacy = k8s_args("legacy", "legacy");
    let mut legacy_prev = prev.clone();
    legacy_prev["ips"][0]["address"] = json!("10.77.9.8/32");
    let l = run(
        &env("ADD", &netns, &legacy),
        &conf("1.0.0", Some(&legacy_prev)),
    )?;
    assert!(l.ok && l.out.as_ref() == Some(&legacy_prev), "{l:?}");
    no_rules()?;
    let c = run(
        &env("CHECK", &netns, &legacy),
        &conf("1.0.0", Some(&legacy_prev)),
    )?;
    assert!(c.ok, "{c:?}");
    Ok(())
}
