//! ztunnel's life is invisible to the pods it serves: stopped (SIGTERM), killed (SIGKILL) or
//! restarted, an enrolled pod's connections are refused while no ztunnel serves it, never
//! carried in plaintext, and they flow again shortly after the restart, also when the
//! controller is down (the node directory keeps the state and the certificates; expired ones
//! are never used). The real binaries: `ambit-controller` in local mode and one `ztunnel` per
//! node, with a sniffer on the fabric. Needs root.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ambit_hbone::Identity;
use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{Pod, ReplyServer, Topology};
use anyhow::{bail, Context};
use nix::sys::signal::Signal;

/// Every payload the client sends starts with this; the fabric must never show it.
const MARKER: &[u8] = b"FAILCLOSED-PAYLOAD-";
/// The bound on time-to-serve after a restart.
const RESUME_BOUND: Duration = Duration::from_secs(2);

/// How one client connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Greeting and echo came back.
    Ok,
    /// The connect was refused (RST to the SYN).
    Refused,
    /// Connected, then closed or reset before any reply.
    Closed,
    /// No answer at all (dropped).
    Timeout,
}

/// One connection from `pod` to `dst`: the payload is written right after connecting, before
/// anything is read, so any path that carried it in plaintext would show it on the fabric.
fn attempt(pod: &Pod, dst: SocketAddr, payload: Vec<u8>, timeout: Duration) -> Outcome {
    let connected = ambit_tests::in_netns(&pod.netns, move || {
        TcpStream::connect_timeout(&dst, timeout)
    });
    let mut s = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            return Outcome::Timeout
        }
        _ => return Outcome::Closed,
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    if s.write_all(&payload).is_err() {
        return Outcome::Closed;
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    // Greeting line, then the echo.
    while !reply.ends_with(&payload) {
        match s.read(&mut buf) {
            Ok(0) => return Outcome::Closed,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                return Outcome::Timeout
            }
            Err(_) => return Outcome::Closed,
        }
    }
    if reply.starts_with(b"local=") {
        Outcome::Ok
    } else {
        Outcome::Closed
    }
}

/// A client that keeps connecting from a pod, recording when each attempt started and how it
/// ended.
struct Client {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, Outcome)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(pod: &Pod, dst: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let counter = AtomicU64::new(0);
        let thread = std::thread::spawn({
            let (stop, log, pod) = (stop.clone(), log.clone(), pod.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let payload = [MARKER, format!("{n:08}").as_bytes()].concat();
                    let started = Instant::now();
                    let outcome = attempt(&pod, dst, payload, Duration::from_secs(1));
                    log.lock().expect("client log").push((started, outcome));
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Client {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// Attempts started in `[from, to)`.
    fn between(&self, from: Instant, to: Instant) -> Vec<Outcome> {
        let log = self.log.lock().expect("client log");
        log.iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, o)| *o)
            .collect()
    }

    /// Waits for the first attempt started after `since` that succeeds; returns when it started
    /// (the time from `since` to a connection that works).
    fn first_ok_after(&self, since: Instant) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .log
                .lock()
                .expect("client log")
                .iter()
                .find(|(t, o)| *t >= since && *o == Outcome::Ok)
                .map(|(t, _)| *t - since);
            if let Some(d) = found {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!(
                    "no successful connection since the restart: {:?}",
                    self.between(since, Instant::now())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The controller and the ztunnels of a topology, as processes.
struct Cluster {
    dir: PathBuf,
    objects: PathBuf,
    state_dir: PathBuf,
    netns_dir: PathBuf,
    grpc: u16,
    controller: Option<Proc>,
    ztunnels: Vec<(String, Option<Proc>, SocketAddr)>,
}

impl Cluster {
    fn new(topo: &Topology, name: &str, mesh_yaml: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("ambit-{}-{name}", topo.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects)?;
        std::fs::write(objects.join("mesh.yaml"), mesh_yaml)?;
        Ok(Cluster {
            state_dir: dir.join("state"),
            objects,
            netns_dir: topo.netns_dir().to_path_buf(),
            grpc: free_port()?,
            controller: None,
            ztunnels: Vec::new(),
            dir,
        })
    }

    fn root(&self) -> PathBuf {
        self.state_dir.join("ca").join("root-cert.pem")
    }

    fn data_dir(&self, node: &str) -> PathBuf {
        self.dir.join(format!("data-{node}"))
    }

    fn start_controller(&mut self) -> anyhow::Result<()> {
        let mut controller = Proc::spawn(
            &ambit_tests::workspace_bin("ambit-controller"),
            &[
                "--local-dir".into(),
                self.objects.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{}", self.grpc),
                "--ops-listen".into(),
                // Nothing here reads it: a fresh port at each start.
                format!("127.0.0.1:{}", free_port()?),
                "--state-dir".into(),
                self.state_dir.display().to_string(),
                "--nodes".into(),
                "n1,n2".into(),
            ],
            self.dir.join("controller.log"),
        )?;
        let (root, state_dir) = (self.root(), self.state_dir.clone());
        let token = |n: &str| state_dir.join("credentials").join(format!("{n}.token"));
        wait("the controller's root and node credentials", || {
            controller.check_alive()?;
            Ok(root.exists() && token("n1").exists() && token("n2").exists())
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.grpc));
        wait("the controller's port", || {
            controller.check_alive()?;
            Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        })?;
        self.controller = Some(controller);
        Ok(())
    }

    fn stop_controller(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.controller.take() {
            c.terminate()?;
        }
        Ok(())
    }

    /// Spawns `node`'s ztunnel (without waiting for anything) and returns when it was spawned.
    fn start_ztunnel(&mut self, node: &str) -> anyhow::Result<Instant> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let run = self.ztunnels.iter().filter(|(n, _, _)| n == node).count();
        let args = vec![
            "--node".into(),
            node.into(),
            "--controller".into(),
            format!("https://127.0.0.1:{}", self.grpc),
            "--ca-root-file".into(),
            self.root().display().to_string(),
            "--credential-file".into(),
            self.state_dir
                .join("credentials")
                .join(format!("{node}.token"))
                .display()
                .to_string(),
            "--netns-dir".into(),
            self.netns_dir.display().to_string(),
            "--data-dir".into(),
            self.data_dir(node).display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--readiness-addr".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--admin-addr".into(),
            admin.to_string(),
            "--drain-seconds".into(),
            "1".into(),
            "--log-format".into(),
            "json".into(),
        ];
        let started = Instant::now();
        let proc = Proc::spawn(
            &ambit_tests::workspace_bin("ztunnel"),
            &args,
            self.dir.join(format!("ztunnel-{node}-{run}.log")),
        )?;
        self.ztunnels.push((node.into(), Some(proc), admin));
        Ok(started)
    }

    fn ztunnel(&mut self, node: &str) -> anyhow::Result<&mut Proc> {
        self.ztunnels
            .iter_mut()
            .rev()
            .find(|(n, p, _)| n == node && p.is_some())
            .and_then(|(_, p, _)| p.as_mut())
            .with_context(|| format!("no ztunnel running for {node}"))
    }

    fn admin(&self, node: &str) -> anyhow::Result<SocketAddr> {
        self.ztunnels
            .iter()
            .rev()
            .find(|(n, p, _)| n == node && p.is_some())
            .map(|(_, _, a)| *a)
            .with_context(|| format!("no ztunnel running for {node}"))
    }

    /// Stops `node`'s ztunnel with `signal`; returns the exit status once it is gone.
    fn stop_ztunnel(
        &mut self,
        node: &str,
        signal: Signal,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let status = self.ztunnel(node)?.signal(signal)?;
        for (n, p, _) in self.ztunnels.iter_mut() {
            if n == node {
                p.take();
            }
        }
        Ok(status)
    }

    /// Every log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        // The controller's first: a failure report cut short still shows why it went away.
        paths.sort_by_key(|p| (!p.ends_with("controller.log"), p.clone()));
        for path in paths {
            if path.extension().is_some_and(|e| e == "log") {
                out.push_str(&format!(
                    "--- {}\n{}\n",
                    path.display(),
                    std::fs::read_to_string(&path).unwrap_or_default()
                ));
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.ztunnels.clear();
        self.controller.take();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn mesh_yaml(enrolled: &[(&Pod, &str, &str)], plain: &[(&Pod, &str)]) -> String {
    let mut yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    \
                    ambit.dev/dataplane-mode: ambient\n---\napiVersion: v1\nkind: Namespace\n\
                    metadata:\n  name: legacy\n"
        .to_string();
    for (pod, sa, node) in enrolled {
        yaml.push_str(&pod_yaml(pod, "shop", sa, node));
    }
    for (pod, node) in plain {
        yaml.push_str(&pod_yaml(pod, "legacy", "default", node));
    }
    yaml
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// Asserts the fabric never carried a client payload, and that the sniffer did see the mesh's
/// TLS and a control payload sent in plaintext on purpose (so it would have seen a leak).
fn assert_no_plaintext(wire: &[u8], control: &[u8]) {
    assert!(contains(wire, &[0x16, 0x03]), "no TLS seen on the fabric");
    assert!(
        contains(wire, control),
        "the sniffer missed the plaintext control payload"
    );
    assert!(
        !contains(wire, MARKER),
        "a client payload crossed the fabric in plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_or_killed_ztunnels_refuse_pods_traffic_and_restarts_resume_it(
) -> anyhow::Result<()> {
    let Some(topo) = Topology::client_and_server("zt_failclosed")
        .pod("plain", "n1")
        .pod("plain-srv", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (client, srv) = (topo.pod("client").clone(), topo.pod("srv").clone());
    let (plain, plain_srv) = (topo.pod("plain").clone(), topo.pod("plain-srv").clone());
    let yaml = mesh_yaml(
        &[(&client, "client", "n1"), (&srv, "srv", "n2")],
        &[(&plain, "n1"), (&plain_srv, "n2")],
    );
    let fabric = topo.namespaces()[0].clone();
    blocking(move || {
        let mut cluster = Cluster::new(&topo, "failclosed", &yaml)?;
        let mut run = || -> anyhow::Result<()> {
            let app = ReplyServer::start(&srv, 8080)?;
            let plain_app = ReplyServer::start(&plain_srv, 8080)?;
            cluster.start_controller()?;
            cluster.start_ztunnel("n1")?;
            cluster.start_ztunnel("n2")?;
            wait("both pods captured", || {
                Ok(captured(&client) && captured(&srv))
            })?;
            let sniffer = Sniffer::start(&fabric)?;
            let mesh = Client::start(&client, app.addr());
            mesh.first_ok_after(Instant::now())
                .context("the mesh never carried the client")?;

            // The destination's ztunnel stops cleanly, then the source's is killed: each
            // time the pods stay captured and every connection fails until the restart.
            for (node, signal) in [("n2", Signal::SIGTERM), ("n1", Signal::SIGKILL)] {
                let status = cluster.stop_ztunnel(node, signal)?;
                if signal == Signal::SIGTERM {
                    assert!(status.success(), "{node} exit {status}");
                }
                // Connections the dying ztunnel had already handed to the app are done.
                std::thread::sleep(Duration::from_millis(100));
                let down = Instant::now();
                let seen_before = app.seen().len();
                assert!(
                    captured(&client) && captured(&srv),
                    "rules left with {node}"
                );
                if node == "n2" {
                    // Plaintext from outside the mesh to srv: TPROXYed to no socket, dropped.
                    let outcome = attempt(
                        &plain,
                        app.addr(),
                        [MARKER, b"plain"].concat(),
                        Duration::from_secs(1),
                    );
                    assert_eq!(outcome, Outcome::Timeout, "plaintext inbound to srv");
                } else {
                    std::thread::sleep(Duration::from_secs(1));
                }
                let restarted = cluster.start_ztunnel(node)?;
                let outage = mesh.between(down, restarted);
                assert!(
                    outage.len() >= 5,
                    "too few attempts in the outage: {outage:?}"
                );
                // n1 down: REDIRECT to a closed 15001 refuses the connect. n2 down: n1
                // accepts, its HBONE dial to srv:15008 is refused, the client is closed.
                let expected = if node == "n1" {
                    Outcome::Refused
                } else {
                    Outcome::Closed
                };
                assert!(
                    outage.iter().all(|o| *o == expected),
                    "{node} down: {outage:?}"
                );
                assert_eq!(app.seen().len(), seen_before, "the app got a connection");
                let resumed = mesh.first_ok_after(restarted)?;
                eprintln!(
                    "time to serve after restarting {node} ({signal}), controller up: {} ms",
                    resumed.as_millis()
                );
                assert!(resumed < RESUME_BOUND, "{node} took {resumed:?} to serve");
            }
            drop(mesh);
            // The control: plaintext between two pods outside the mesh is visible.
            let control = b"CONTROL-IN-CLEAR-42";
            let outcome = attempt(
                &plain,
                plain_app.addr(),
                control.to_vec(),
                Duration::from_secs(2),
            );
            assert_eq!(outcome, Outcome::Ok);
            std::thread::sleep(Duration::from_millis(100));
            assert_no_plaintext(&sniffer.bytes(), control);
            Ok(())
        };
        let result = run();
        result.with_context(|| cluster.logs())
    })
    .await
}

/// A certificate for `identity` from the controller's root, expired a minute ago.
fn expired_cert(
    state_dir: &Path,
    identity: &Identity,
) -> anyhow::Result<ambit_hbone::cert::WorkloadCertificate> {
    let ca = ambit_hbone::ca::CertificateAuthority::from_pem(
        "cluster.local",
        &std::fs::read_to_string(state_dir.join("ca/root-cert.pem"))?,
        &std::fs::read_to_string(state_dir.join("ca/root-key.pem"))?,
        None,
    )?;
    let req = ambit_hbone::csr::new_csr(identity)?;
    let csr = ca.validate_csr(&req.csr_pem, None)?;
    let now = SystemTime::now();
    let chain = ca.sign_between(
        &csr,
        now - Duration::from_secs(3600),
        now - Duration::from_secs(60),
    )?;
    Ok(ambit_hbone::cert::WorkloadCertificate::new(
        chain,
        req.private_key(),
        ca.trust_roots(),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_controller_down_serves_from_the_node_directory() -> anyhow::Result<()> {
    let Some(topo) = Topology::client_and_server("zt_nodedir").build_or_skip() else {
        return Ok(());
    };
    let (client, srv) = (topo.pod("client").clone(), topo.pod("srv").clone());
    let yaml = mesh_yaml(&[(&client, "client", "n1"), (&srv, "srv", "n2")], &[]);
    blocking(move || {
        let mut cluster = Cluster::new(&topo, "nodedir", &yaml)?;
        let mut run = || -> anyhow::Result<()> {
            let app = ReplyServer::start(&srv, 8080)?;
            cluster.start_controller()?;
            cluster.start_ztunnel("n1")?;
            cluster.start_ztunnel("n2")?;
            let mesh = Client::start(&client, app.addr());
            mesh.first_ok_after(Instant::now())?;

            // What n2 keeps: the acknowledged state and srv's certificate, owner-only.
            let data = cluster.data_dir("n2");
            let srv_id = Identity::new("cluster.local", "shop", "srv")?;
            let node_dir = ambit_ztunnel::node_dir::NodeDir::open(&data, "n2")?;
            let cert_file = node_dir.cert_path(&srv_id);
            wait("n2's state and certificate on disk", || {
                Ok(node_dir.state_path().exists() && cert_file.exists())
            })?;
            assert_eq!(mode(&data)?, 0o700);
            assert_eq!(mode(&data.join("certs"))?, 0o700);
            assert_eq!(mode(&cert_file)?, 0o600);
            assert_eq!(mode(&node_dir.state_path())?, 0o600);
            assert!(std::fs::read_to_string(&cert_file)?.contains("PRIVATE KEY"));

            // The controller goes away, n2's ztunnel is killed and restarted: it serves from
            // the node directory.
            cluster.stop_controller()?;
            cluster.stop_ztunnel("n2", Signal::SIGKILL)?;
            let restarted = cluster.start_ztunnel("n2")?;
            let resumed = mesh.first_ok_after(restarted)?;
            eprintln!(
                "time to serve after restarting n2 (SIGKILL), controller down: {} ms",
                resumed.as_millis()
            );
            assert!(resumed < RESUME_BOUND, "n2 took {resumed:?} to serve");

            // An expired certificate on disk is never used: with it and no CA, srv is not
            // served (the client's connections fail), and its identity waits for the CA.
            cluster.stop_ztunnel("n2", Signal::SIGTERM)?;
            node_dir.save_cert(&expired_cert(&cluster.state_dir, &srv_id)?)?;
            let restarted = cluster.start_ztunnel("n2")?;
            let admin = cluster.admin("n2")?;
            wait("n2 back with srv's identity pending", || {
                Ok(http_get(admin, "/certs").is_ok_and(|(status, body)| {
                    status == 200 && body.contains("shop/sa/srv") && body.contains("pending")
                }))
            })?;
            std::thread::sleep(Duration::from_secs(1));
            let without_ca = mesh.between(restarted, Instant::now());
            assert!(
                !without_ca.is_empty() && !without_ca.contains(&Outcome::Ok),
                "served without a valid certificate: {without_ca:?}"
            );
            let logs = cluster.ztunnel("n2")?.logs();
            assert!(
                logs.contains("not using the certificate kept in the node directory")
                    && logs.contains("expired"),
                "{logs}"
            );
            // The CA is back: a fresh certificate, traffic resumes, the kept one is replaced.
            let back = Instant::now();
            cluster.start_controller()?;
            mesh.first_ok_after(back)?;
            wait("a valid certificate kept again", || {
                Ok(node_dir
                    .load_cert(&srv_id, SystemTime::now())
                    .is_ok_and(|c| c.is_some()))
            })?;
            Ok(())
        };
        let result = run();
        result.with_context(|| cluster.logs())
    })
    .await
}
