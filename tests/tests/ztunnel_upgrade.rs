//! Upgrading a node's ztunnel under load resets nothing: while a new `ztunnel` process takes
//! over from the running one (the real binary, twice: once receiving the listening sockets
//! over the node directory's hand-over socket, once with the hand-over forced to fail so it
//! binds beside them with SO_REUSEPORT), new connections keep arriving at more than 200 a
//! second and 20 long-lived streams exchange a checked message every 100 ms, both ways through
//! the upgraded node (its pod's outbound 15001 and inbound HBONE 15008). Every connect
//! succeeds, nothing is reset, every byte comes back as sent, and the old process exits by
//! itself once its last connection ends (its upgrade drain deadline is far away). The figures
//! are printed for the record. Needs root.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{Pod, ReplyServer, Topology};
use anyhow::{bail, Context};

/// New connections per second asked of the load (the floor is 200).
const RATE: u64 = 240;
/// Threads opening them, each paced to its share: several, so that one slow exchange on a
/// busy machine does not hold the rate down.
const CONNECTORS: u64 = 8;
/// Long-lived streams, half each way.
const STREAMS: usize = 20;
/// Their message interval.
const TICK: Duration = Duration::from_millis(100);
/// How long the old process may keep its connections after handing over: far beyond the
/// test, so its exit can only come from its last connection ending.
const UPGRADE_DRAIN_SECONDS: &str = "120";

/// What the load saw.
#[derive(Debug, Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    resets: AtomicU64,
    lost: AtomicU64,
    corrupted: AtomicU64,
    stalled: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_checked: AtomicU64,
    messages: AtomicU64,
}

/// A failure of one exchange, by what the client saw.
fn classify(c: &Counters, e: &std::io::Error) {
    let counter = match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            &c.resets
        }
        ErrorKind::UnexpectedEof => &c.lost,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => &c.stalled,
        _ => &c.lost,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn connect(pod: &Pod, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = ambit_tests::in_netns(&pod.netns, move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(3))
    })
    .map_err(std::io::Error::other)??;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// Reads the reply server's greeting line.
fn greeting(s: &mut TcpStream) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(());
        }
    }
}

/// Sends `msg`, reads the echo, and checks it; counts what went wrong.
fn exchange(c: &Counters, s: &mut TcpStream, msg: &[u8]) -> bool {
    if let Err(e) = s.write_all(msg) {
        classify(c, &e);
        return false;
    }
    c.bytes_sent.fetch_add(msg.len() as u64, Ordering::Relaxed);
    let mut back = vec![0u8; msg.len()];
    if let Err(e) = s.read_exact(&mut back) {
        classify(c, &e);
        return false;
    }
    if back != msg {
        c.corrupted.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    c.bytes_checked
        .fetch_add(msg.len() as u64, Ordering::Relaxed);
    true
}

/// New connections and long-lived streams between two pods, both ways, until stopped.
struct Load {
    short: Arc<Counters>,
    long: Arc<Counters>,
    stop_short: Arc<AtomicBool>,
    stop_long: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    fn start(routes: &[(Pod, SocketAddr)]) -> anyhow::Result<Self> {
        let (short, long) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let (stop_short, stop_long) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut threads = Vec::new();
        // Streams first: each is open (greeting read) before the load is considered started.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for i in 0..STREAMS {
            let (pod, dst) = routes[i % routes.len()].clone();
            let (c, stop, ready) = (long.clone(), stop_long.clone(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                let mut s = match connect(&pod, dst).and_then(|mut s| greeting(&mut s).map(|()| s))
                {
                    Ok(s) => s,
                    Err(e) => {
                        c.connect_failures.fetch_add(1, Ordering::Relaxed);
                        let _ = ready.send(Err(format!("stream {i}: {e}")));
                        return;
                    }
                };
                c.connects.fetch_add(1, Ordering::Relaxed);
                let _ = ready.send(Ok(()));
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("stream-{i:02}-message-{seq:08}-{}\n", "x".repeat(i * 3));
                    if !exchange(&c, &mut s, msg.as_bytes()) {
                        return;
                    }
                    c.messages.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                    std::thread::sleep(TICK);
                }
                // A clean close: the proxies see EOF, not a reset.
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            }));
        }
        drop(ready_tx);
        for _ in 0..STREAMS {
            if let Ok(Err(e)) = ready_rx.recv_timeout(WAIT) {
                bail!("a long-lived stream did not open: {e}");
            }
        }
        let per_thread = Duration::from_nanos(1_000_000_000 * CONNECTORS / RATE);
        for t in 0..CONNECTORS {
            let (pod, dst) = routes[t as usize % routes.len()].clone();
            let (c, stop) = (short.clone(), stop_short.clone());
            threads.push(std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let payload = format!("conn-{t}-{n:08}-payload");
                    match connect(&pod, dst) {
                        Ok(mut s) => {
                            c.connects.fetch_add(1, Ordering::Relaxed);
                            match greeting(&mut s) {
                                Ok(()) => {
                                    exchange(&c, &mut s, payload.as_bytes());
                                }
                                Err(e) => classify(&c, &e),
                            }
                        }
                        Err(_) => {
                            c.connect_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    next += per_thread;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            }));
        }
        Ok(Load {
            short,
            long,
            stop_short,
            stop_long,
            threads,
            started: Instant::now(),
        })
    }

    /// Stops everything (streams close cleanly) and returns the figures.
    fn stop(self) -> Figures {
        self.stop_short.store(true, Ordering::Relaxed);
        self.stop_long.store(true, Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        for t in self.threads {
            let _ = t.join();
        }
        Figures {
            seconds,
            short: self.short,
            long: self.long,
        }
    }
}

struct Figures {
    seconds: f64,
    short: Arc<Counters>,
    long: Arc<Counters>,
}

impl Figures {
    fn print(&self, what: &str) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (s, l) = (&self.short, &self.long);
        eprintln!(
            "upgrade under load ({what}): {:.1} s; new connections: {} ({:.0}/s), failed connects {}, resets {}, lost {}, corrupted {}, stalled {}, {} bytes sent / {} checked; \
             long-lived streams: {} open, {} messages, failed connects {}, resets {}, lost {}, corrupted {}, stalled {}, {} bytes sent / {} checked",
            self.seconds,
            g(&s.connects),
            g(&s.connects) as f64 / self.seconds,
            g(&s.connect_failures),
            g(&s.resets),
            g(&s.lost),
            g(&s.corrupted),
            g(&s.stalled),
            g(&s.bytes_sent),
            g(&s.bytes_checked),
            g(&l.connects),
            g(&l.messages),
            g(&l.connect_failures),
            g(&l.resets),
            g(&l.lost),
            g(&l.corrupted),
            g(&l.stalled),
            g(&l.bytes_sent),
            g(&l.bytes_checked),
        );
    }

    fn assert_clean(&self, what: &str) {
        for (name, c) in [("new connections", &self.short), ("streams", &self.long)] {
            let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
            assert_eq!(g(&c.connect_failures), 0, "{what}: {name}: failed connects");
            assert_eq!(g(&c.resets), 0, "{what}: {name}: resets");
            assert_eq!(g(&c.lost), 0, "{what}: {name}: lost bytes");
            assert_eq!(g(&c.corrupted), 0, "{what}: {name}: corrupted bytes");
            assert_eq!(g(&c.stalled), 0, "{what}: {name}: stalled exchanges");
            assert_eq!(
                g(&c.bytes_sent),
                g(&c.bytes_checked),
                "{what}: {name}: bytes"
            );
        }
        assert_eq!(
            self.long.connects.load(Ordering::Relaxed),
            STREAMS as u64,
            "{what}: streams open"
        );
    }
}

/// The node's ztunnel: the same flags for every process of the node, so a new one finds the
/// old one's hand-over socket in the same node directory and the same ops ports.
struct Node {
    name: String,
    dir: PathBuf,
    args: Vec<String>,
    readiness: SocketAddr,
    runs: usize,
}

impl Node {
    fn new(name: &str, dir: &Path, state: &Path, netns_dir: &Path) -> anyhow::Result<Self> {
        let readiness = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let args = [
            "--node",
            name,
            "--static-state",
            &state.display().to_string(),
            "--local-ca-cert",
            &dir.join("ca-cert.pem").display().to_string(),
            "--local-ca-key",
            &dir.join("ca-key.pem").display().to_string(),
            "--netns-dir",
            &netns_dir.display().to_string(),
            "--data-dir",
            &dir.join(format!("data-{name}")).display().to_string(),
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()?),
            "--readiness-addr",
            &readiness.to_string(),
            "--admin-addr",
            &format!("127.0.0.1:{}", free_port()?),
            "--drain-seconds",
            "1",
            "--upgrade-drain-seconds",
            UPGRADE_DRAIN_SECONDS,
            "--log-format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Ok(Node {
            name: name.into(),
            dir: dir.to_path_buf(),
            args,
            readiness,
            runs: 0,
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir
            .join(format!("data-{}", self.name))
            .join(ambit_ztunnel::handover::SOCKET_NAME)
    }

    fn spawn(&mut self, extra: &[&str]) -> anyhow::Result<Proc> {
        self.runs += 1;
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(
            &ambit_tests::workspace_bin("ztunnel"),
            &args,
            self.dir
                .join(format!("ztunnel-{}-{}.log", self.name, self.runs)),
        )
    }

    /// The inode of the hand-over socket: a successor renames its own into place only once
    /// it serves everything and has told the old one to drain.
    fn socket_inode(&self) -> Option<u64> {
        std::fs::metadata(self.socket()).ok().map(|m| m.ino())
    }

    fn ready(&self) -> bool {
        http_get(self.readiness, "/healthz/ready").is_ok_and(|(status, _)| status == 200)
    }
}

fn wait_exit(proc: &mut Proc, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = proc.child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("still running after {within:?}: {}", proc.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces `node`'s running ztunnel (`old`) with a new process under load; returns the new
/// one and the figures.
fn upgrade_under_load(
    node: &mut Node,
    old: &mut Proc,
    routes: &[(Pod, SocketAddr)],
    extra: &[&str],
) -> anyhow::Result<(Proc, Figures)> {
    let before = node.socket_inode().context("no hand-over socket")?;
    let load = Load::start(routes)?;
    std::thread::sleep(Duration::from_secs(1));
    let upgrading = Instant::now();
    let mut new = node.spawn(extra)?;
    wait("the new ztunnel to take over", || {
        new.check_alive()?;
        Ok(node.socket_inode().is_some_and(|i| i != before) && node.ready())
    })?;
    eprintln!(
        "{}: the new ztunnel took over {} ms after it was started",
        node.name,
        upgrading.elapsed().as_millis()
    );
    // The old one no longer accepts, but serves what it had; load keeps flowing.
    std::thread::sleep(Duration::from_millis(1500));
    old.check_alive()
        .context("the old ztunnel exited with connections open")?;
    let figures = load.stop();
    let closed = Instant::now();
    let status = wait_exit(old, Duration::from_secs(15))?;
    assert!(status.success(), "old ztunnel exit: {status}");
    eprintln!(
        "{}: the old ztunnel exited {} ms after its last streams closed (upgrade drain deadline {UPGRADE_DRAIN_SECONDS} s)",
        node.name,
        closed.elapsed().as_millis()
    );
    Ok((new, figures))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_upgraded_under_load_resets_nothing() -> anyhow::Result<()> {
    let Some(topo) = Topology::builder("zt_upgrade")
        .node("n1")
        .node("n2")
        .pod("a", "n1")
        .pod("b", "n2")
        .build_or_skip()
    else {
        return Ok(());
    };
    let (a, b) = (topo.pod("a").clone(), topo.pod("b").clone());
    blocking(move || {
        let dir = std::env::temp_dir().join(format!("ambit-{}-upgrade", topo.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ca = ambit_hbone::ca::CertificateAuthority::generate(
            "cluster.local",
            Duration::from_secs(86400),
        )?
        .to_pem();
        std::fs::write(dir.join("ca-cert.pem"), ca.cert_pem)?;
        std::fs::write(dir.join("ca-key.pem"), ca.key_pem)?;
        let state = dir.join("state.yaml");
        std::fs::write(
            &state,
            format!(
                "workloads:\n{}{}",
                workload(&a, "shop", "a", "n1", true),
                workload(&b, "shop", "b", "n2", true)
            ),
        )?;
        let mut n1 = Node::new("n1", &dir, &state, topo.netns_dir())?;
        let mut n2 = Node::new("n2", &dir, &state, topo.netns_dir())?;
        let logs = |dir: &Path| {
            let mut out = String::new();
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    out += &format!(
                        "--- {}\n{}\n",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    );
                }
            }
            out
        };
        let mut run = || -> anyhow::Result<()> {
            let app_a = ReplyServer::start(&a, 8080)?;
            let app_b = ReplyServer::start(&b, 8080)?;
            let mut z1 = n1.spawn(&[])?;
            let _z2 = n2.spawn(&[])?;
            let captured = |pod: &Pod| {
                ambit_tests::exec_in(&pod.netns, &["iptables-save"])
                    .is_ok_and(|r| r.contains("AMBIT_V1_"))
            };
            wait("both ztunnels ready and both pods captured", || {
                z1.check_alive()?;
                Ok(n1.ready()
                    && n2.ready()
                    && n1.socket_inode().is_some()
                    && captured(&a)
                    && captured(&b))
            })?;
            // a -> b leaves through n1's 15001; b -> a arrives at n1's 15008.
            let routes = [(a.clone(), app_b.addr()), (b.clone(), app_a.addr())];
            for (pod, dst) in &routes {
                let mut s = ambit_tests::connect_from(pod, *dst)?;
                let seen = ambit_tests::read_greeting(&mut s)?;
                // Through the mesh: the app sees the client pod's own address.
                assert_eq!(seen.peer.ip(), std::net::IpAddr::from(pod.ip));
            }

            let (mut z1, handed) = upgrade_under_load(&mut n1, &mut z1, &routes, &[])?;
            handed.print("listeners handed over");
            let log = z1.logs();
            assert!(
                log.contains("took over the listening sockets of the running ztunnel"),
                "{log}"
            );
            handed.assert_clean("hand-over");

            let (mut z1, fallback) =
                upgrade_under_load(&mut n1, &mut z1, &routes, &["--handover", "reuseport"])?;
            fallback.print("hand-over forced to fail: SO_REUSEPORT");
            let log = z1.logs();
            assert!(log.contains("binding beside them (SO_REUSEPORT)"), "{log}");
            fallback.assert_clean("SO_REUSEPORT fallback");
            z1.check_alive()?;
            Ok(())
        };
        let result = run().with_context(|| logs(&dir));
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    })
    .await
}
