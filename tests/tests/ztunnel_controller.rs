//! The real binaries together: `ambit-controller` in local mode (a folder of Kubernetes YAML,
//! its own generated root, node credentials) serving discovery and the CA over TLS, and one
//! `ztunnel` per node that learns the pods from it, gets their certificates from it
//! (`CreateCertificate` with the node's bearer token) and carries their traffic over HBONE.
//! Needs root.

mod ztunnel_support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_tests::{exec_in, Pod, ReplyServer, Topology};
use anyhow::{bail, Context};
use ztunnel_support::*;

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {out:?}"))?;
    Ok((status, out))
}

/// A child process, killed if the test ends without stopping it; output in `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Proc { child, log })
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("exited early ({status}): {}", self.logs());
        }
        Ok(())
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("did not exit after SIGTERM: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn pod_yaml(pod: &Pod, ns: &str, sa: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {ns}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         uid: uid-{name}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  \
         containers:\n  - name: app\n    image: app\nstatus:\n  podIP: {ip}\n",
        name = pod.name,
        ip = pod.ip
    )
}

fn wait(what: &str, mut cond: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_ztunnels_as_processes_carry_hbone_with_ca_issued_identities(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_ctrl")
        .node("n1")
        .node("n2")
        .pod("client", "n1")
        .pod("srv", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, srv) = (topo.pod("client").clone(), topo.pod("srv").clone());
    let (controller_bin, ztunnel_bin) = blocking(|| {
        Ok((
            ambit_tests::workspace_bin("ambit-controller"),
            ambit_tests::workspace_bin("ztunnel"),
        ))
    })
    .await?;
    let dir = std::env::temp_dir().join(format!("ambit-{}-ctrl", topo.prefix()));
    let objects = dir.join("objects");
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&objects)?;
    std::fs::write(
        objects.join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    \
             ambit.dev/dataplane-mode: ambient\n{}{}",
            pod_yaml(&client, "shop", "client", "n1"),
            pod_yaml(&srv, "shop", "srv", "n2"),
        ),
    )?;
    let app = ReplyServer::start(&srv, 8080)?;

    let grpc = free_port()?;
    let ops = free_port()?;
    let netns_dir = topo.netns_dir().to_path_buf();
    let (mut controller, mut zs) = blocking({
        let dir = dir.clone();
        move || {
            let mut controller = Proc::spawn(
                &controller_bin,
                &[
                    "--local-dir".into(),
                    objects.display().to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{grpc}"),
                    "--ops-listen".into(),
                    format!("127.0.0.1:{ops}"),
                    "--state-dir".into(),
                    state_dir.display().to_string(),
                    "--nodes".into(),
                    "n1,n2".into(),
                ],
                dir.join("controller.log"),
            )?;
            let root = state_dir.join("ca").join("root-cert.pem");
            let token = |n: &str| state_dir.join("credentials").join(format!("{n}.token"));
            wait("the controller's root and node credentials", || {
                controller.check_alive()?;
                Ok(root.exists() && token("n1").exists() && token("n2").exists())
            })?;
            let mut zs = Vec::new();
            for node in ["n1", "n2"] {
                let readiness = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                let z = Proc::spawn(
                    &ztunnel_bin,
                    &[
                        "--node".into(),
                        node.into(),
                        "--controller".into(),
                        format!("https://127.0.0.1:{grpc}"),
                        "--ca-root-file".into(),
                        root.display().to_string(),
                        "--credential-file".into(),
                        token(node).display().to_string(),
                        "--netns-dir".into(),
                        netns_dir.display().to_string(),
                        "--metrics-addr".into(),
                        metrics.to_string(),
                        "--readiness-addr".into(),
                        readiness.to_string(),
                        "--admin-addr".into(),
                        format!("127.0.0.1:{}", free_port()?),
                        "--drain-seconds".into(),
                        "2".into(),
                    ],
                    dir.join(format!("{node}.log")),
                )?;
                zs.push((z, readiness, metrics));
            }
            for (z, readiness, _) in zs.iter_mut() {
                let addr = *readiness;
                wait("ztunnel readiness", || {
                    z.check_alive()?;
                    Ok(matches!(http_get(addr, "/healthz/ready"), Ok((200, _))))
                })
                .with_context(|| z.logs())?;
            }
            Ok((controller, zs))
        }
    })
    .await?;

    let (c, s) = (client.clone(), srv.clone());
    eventually("capture rules in both pods", || {
        exec_in(&c.netns, &["iptables-save"]).is_ok_and(|r| r.contains("AMBIT_OUTPUT"))
            && exec_in(&s.netns, &["iptables-save"]).is_ok_and(|r| r.contains("AMBIT_OUTPUT"))
    })
    .await?;
    let seen = round_trip(&client, app.addr(), b"via-controller").await?;
    assert_eq!(seen.ip(), IpAddr::from(client.ip));

    // n1 tunnelled it as the client's CA-issued identity to the server's.
    let metrics = zs[0].2;
    blocking(move || {
        wait("n1 metrics", || {
            let (_, body) = http_get(metrics, "/metrics")?;
            Ok(body.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                    && l.contains("destination_principal=\"spiffe://cluster.local/ns/shop/sa/srv\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            }))
        })
    })
    .await?;

    for (z, _, _) in zs.iter_mut() {
        let status = z.terminate()?;
        assert!(status.success(), "ztunnel exit {status}: {}", z.logs());
    }
    let _ = controller.terminate();
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
