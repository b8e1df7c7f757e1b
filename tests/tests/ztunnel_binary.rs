//! The real `ztunnel` binary, one process per node: flags, readiness, HBONE between nodes,
//! metrics and access log over the real ports, and SIGTERM draining to exit 0 with the pods
//! left captured (refused until a ztunnel serves them again). Certificates come from a local
//! CA given as files (`--local-ca-*`), since the controller's CA service is not offered yet.
//! Needs root.

mod ztunnel_support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_tests::{exec_in, ReplyServer, Topology};
use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ztunnel_support::*;

/// A ztunnel process; killed if the test ends without stopping it.
struct Ztunnel {
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
    readiness: SocketAddr,
}

impl Ztunnel {
    fn spawn(node: &str, dir: &Path, netns_dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{node}.log"));
        let (m, r, a) = (free_port()?, free_port()?, free_port()?);
        let child = Command::new(ambit_tests::workspace_bin("ztunnel"))
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
            .args(["--drain-seconds", "2", "--log-format", "json"])
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join(format!("{node}.err")))?)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start ztunnel")?;
        Ok(Ztunnel {
            child,
            log,
            metrics: SocketAddr::from(([127, 0, 0, 1], m)),
            readiness: SocketAddr::from(([127, 0, 0, 1], r)),
        })
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("ztunnel exited early ({status}): {}", self.logs());
            }
            if matches!(http_get(self.readiness, "/healthz/ready"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("ztunnel not ready: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        let err = self.log.with_extension("err");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }

    /// SIGTERM, then the exit status within the bound.
    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        kill(pid, Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("ztunnel did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ztunnel_binary_carries_hbone_between_nodes_and_drains_on_sigterm() -> anyhow::Result<()>
{
    let Some(topo) = Topology::builder("zt_binary")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("srv", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, srv) = (topo.pod("client").clone(), topo.pod("srv").clone());
    let dir = std::env::temp_dir().join(format!("ambit-{}-bin", topo.prefix()));
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new(Duration::from_secs(3600));
    let pem = ca.ca.to_pem();
    std::fs::write(dir.join("ca.pem"), &pem.cert_pem)?;
    std::fs::write(dir.join("ca-key.pem"), &pem.key_pem)?;
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
    let (c, s) = (client.clone(), srv.clone());
    eventually("capture rules in both pods", || {
        exec_in(&c.netns, &["iptables-save"]).is_ok_and(|r| r.contains("AMBIT_OUTPUT"))
            && exec_in(&s.netns, &["iptables-save"]).is_ok_and(|r| r.contains("AMBIT_OUTPUT"))
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
    let z2_log = z2.log.clone();
    eventually("inbound access log line on n2", || {
        std::fs::read_to_string(&z2_log).is_ok_and(|l| {
            l.lines().any(|line| {
                line.contains("connection complete")
                    && line.contains("\"direction\":\"inbound\"")
                    && line.contains("\"protocol\":\"hbone\"")
                    && line.contains("spiffe://cluster.local/ns/app/sa/client")
                    && line.contains("\"outcome\":\"ok\"")
            })
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
