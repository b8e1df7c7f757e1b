//! The real `ztunnel` binary, one process per node: flags, readiness, HBONE between nodes,
//! metrics and access log over the real ports, and SIGTERM draining to exit 0 with the pods
//! left captured (refused until a ztunnel serves them again). Certificates come from a local
//! CA given as files (`--local-ca-*`), since the controller's CA service is not offered yet.
//! Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{exec_in, in_netns, ReplyServer, Topology};
use anyhow::{bail, Context};

/// A ztunnel process; killed if the test ends without stopping it.
struct Ztunnel {
    proc: Proc,
    metrics: SocketAddr,
    readiness: SocketAddr,
}

impl Ztunnel {
    fn spawn(node: &str, dir: &Path, netns_dir: &Path) -> anyhow::Result<Self> {
        let (m, r, a) = (free_port()?, free_port()?, free_port()?);
        let mut command = Command::new(ambit_tests::workspace_bin("ztunnel"));
        command
            .args(["--node", node])
            .arg("--static-state")
            .arg(dir.join("state.yaml"))
            .arg("--local-ca-cert")
            .arg(dir.join("ca.pem"))
            .arg("--local-ca-key")
            .arg(dir.join("ca-key.pem"))
            .arg("--netns-dir")
            .arg(netns_dir)
            .arg("--data-dir")
            .arg(dir.join(format!("data-{node}")))
            .args(["--metrics-addr", &format!("127.0.0.1:{m}")])
            .args(["--readiness-addr", &format!("127.0.0.1:{r}")])
            .args(["--admin-addr", &format!("127.0.0.1:{a}")])
            .args(["--drain-seconds", "2", "--log-format", "json"]);
        if node == "n1" {
            // One runtime thread on one side: nothing in ztunnel may need a second one to
            // make progress (the other side runs the default, one per CPU).
            command.args(["--worker-threads", "1"]);
        }
        Ok(Ztunnel {
            proc: Proc::start(command, dir.join(format!("{node}.log")))?,
            metrics: SocketAddr::from(([127, 0, 0, 1], m)),
            readiness: SocketAddr::from(([127, 0, 0, 1], r)),
        })
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.proc
            .wait_http_ok(self.readiness, "/healthz/ready")
            .context("ztunnel not ready")
    }

    /// SIGTERM, then the exit status within the bound.
    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.proc.terminate()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ztunnel_binary_carries_hbone_between_nodes_and_drains_on_sigterm() -> anyhow::Result<()>
{
    let Some(topo) = Topology::client_and_server("zt_binary").build_or_skip() else {
        return Ok(());
    };
    let (client, srv) = (topo.pod("client").clone(), topo.pod("srv").clone());
    let dir = std::env::temp_dir().join(format!("ambit-{}-bin", topo.prefix()));
    std::fs::create_dir_all(&dir)?;
    TestCa::new(Duration::from_secs(3600)).write_files(&dir)?;
    std::fs::write(
        dir.join("state.yaml"),
        format!(
            "workloads:\n{}{}",
            workload(&client, "app", "client", "n1", true),
            workload(&srv, "app", "srv", "n2", true)
        ),
    )?;
    let app = ReplyServer::start(&srv, 8080)?;

    let (dir2, netns_dir) = (dir.clone(), topo.netns_dir().to_path_buf());
    let (mut z1, mut z2) = blocking(move || {
        let mut z1 = Ztunnel::spawn("n1", &dir2, &netns_dir)?;
        let mut z2 = Ztunnel::spawn("n2", &dir2, &netns_dir)?;
        z1.wait_ready()?;
        z2.wait_ready()?;
        Ok((z1, z2))
    })
    .await?;

    // Readiness does not mean every pod is captured yet: wait for the rules.
    eventually("capture rules in both pods", || {
        captured(&client) && captured(&srv)
    })
    .await?;

    let seen = round_trip(&client, app.addr(), b"through-the-binary").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));

    // Metrics over the real port, and the access log line of the inbound side.
    let metrics = z1.metrics;
    let want = "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"";
    let body = blocking(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = http_get(metrics, "/metrics")?;
            if status == 200
                && body.contains("istio_tcp_connections_opened_total")
                && body.contains(want)
            {
                return Ok(body);
            }
            if Instant::now() > deadline {
                bail!("metrics never showed the connection: {body}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await?;
    assert!(body.contains("connection_security_policy=\"mutual_tls\""));
    eventually("inbound access log line on n2", || {
        z2.proc.logs().lines().any(|line| {
            line.contains("connection complete")
                && line.contains("\"direction\":\"inbound\"")
                && line.contains("\"protocol\":\"hbone\"")
                && line.contains("spiffe://cluster.local/ns/app/sa/client")
                && line.contains("\"outcome\":\"ok\"")
        })
    })
    .await?;

    // SIGTERM: drain, exit 0. The pods stay enrolled, so they stay captured: refused until a
    // ztunnel serves them again, never let through in plaintext.
    let (s1, s2) = blocking(move || Ok((z1.terminate()?, z2.terminate()?))).await?;
    assert!(s1.success() && s2.success(), "exit statuses {s1} {s2}");
    for pod in [&client, &srv] {
        let rules = exec_in(&pod.netns, &["iptables-save"])?;
        assert!(
            rules.contains("AMBIT_OUTPUT") && rules.contains("AMBIT_PRERT"),
            "rules gone from {}: {rules}",
            pod.name
        );
    }
    let seen_before = app.seen().len();
    assert!(
        round_trip(&client, app.addr(), b"while-down")
            .await
            .is_err(),
        "a connection got through with no ztunnel"
    );
    assert_eq!(app.seen().len(), seen_before);
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// In dedicated mode ztunnel shares its workload's namespace and nothing captures it before
/// ztunnel does, so ready must mean captured: a client that waits for readiness and connects
/// at once must go through the mesh. Installing the rules is made slow here (iptables-restore
/// behind a wrapper that waits first), so a readiness that did not wait for them would answer
/// long before they exist; the first ready answer must find them in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_ztunnel_is_ready_only_once_its_namespace_is_captured() -> anyhow::Result<()> {
    let Some(topo) = Topology::client_and_server("zt_dedicated").build_or_skip() else {
        return Ok(());
    };
    let vm = topo.pod("client").clone();
    let dir = std::env::temp_dir().join(format!("ambit-{}-bin", topo.prefix()));
    std::fs::create_dir_all(&dir)?;
    TestCa::new(Duration::from_secs(3600)).write_files(&dir)?;
    std::fs::write(
        dir.join("state.yaml"),
        format!("workloads:\n{}", workload(&vm, "app", "vm", "n1", true)),
    )?;
    // Slow rule installs: each restore waits a second, then runs the real one.
    let slow = dir.join("slow-tools");
    std::fs::create_dir_all(&slow)?;
    let path = std::env::var("PATH").unwrap_or_default();
    for tool in ["iptables-restore", "ip6tables-restore"] {
        let real = path
            .split(':')
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .with_context(|| format!("{tool} not found on PATH"))?;
        let wrapper = slow.join(tool);
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nsleep 1\nexec {} \"$@\"\n", real.display()),
        )?;
        std::process::Command::new("chmod")
            .arg("755")
            .arg(&wrapper)
            .status()?;
    }
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &vm.netns, "env"])
        // Through env(1), so that `ip` itself is found on the test's own PATH.
        .arg(format!("PATH={}:{path}", slow.display()))
        .arg(ambit_tests::workspace_bin("ztunnel"))
        .args(["--node", "n1", "--mode", "dedicated"])
        .arg("--static-state")
        .arg(dir.join("state.yaml"))
        .arg("--local-ca-cert")
        .arg(dir.join("ca.pem"))
        .arg("--local-ca-key")
        .arg(dir.join("ca-key.pem"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--drain-seconds", "1", "--log-format", "json"]);
    let mut ztunnel = Proc::start(command, dir.join("dedicated.log"))?;
    let ns = vm.netns.clone();
    let (rules, waited) = blocking(move || {
        let start = Instant::now();
        let deadline = start + WAIT;
        loop {
            // The readiness port, asked from inside the namespace.
            let ready = in_netns(&ns, || {
                http_get(SocketAddr::from(([127, 0, 0, 1], 15021)), "/healthz/ready")
            })?;
            if matches!(ready, Ok((200, _))) {
                return Ok((
                    exec_in(&ns, &["iptables-save", "-t", "nat"])?,
                    start.elapsed(),
                ));
            }
            if Instant::now() > deadline {
                bail!("never ready");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await?;
    assert!(
        rules.contains("-j REDIRECT --to-ports 15001"),
        "ready after {waited:?}, before the outbound capture:\n{rules}\nlog:\n{}",
        ztunnel.logs()
    );
    ztunnel.terminate()?;
    let ns = vm.netns.clone();
    in_netns(&ns, || {
        ambit_ztunnel::capture::iptables::remove(
            &ambit_ztunnel::capture::iptables::RuleConfig::dedicated(),
        )
    })??;
    Ok(())
}
