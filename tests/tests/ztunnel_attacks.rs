//! Attacks on a node's ztunnel, run as a hostile pod would, against the real binary (its own
//! process, so its descriptors and RSS can be read from /proc): the self-dial loop, a non-mesh
//! pod holding thousands of plaintext connections to an enrolled pod, and a junk flood on
//! 15008 and 15006.
//!
//! Each asserts what the victims see: another pod on the same node keeps working through the
//! attack (every connection succeeds; p99 of connect+echo within 2x of before, with an absolute
//! floor for a busy CI machine), ztunnel's descriptors and RSS stay under the bounds its
//! configured caps imply, RSS after the attack is back within 20% of its warmed-up baseline,
//! and the log stays bounded. The figures are printed (`-- --nocapture`).
//!
//! The limits are given as environment variables rather than flags, so the same test can be
//! pointed at an older binary (`AMBIT_ZTUNNEL_BIN=/path/to/ztunnel`) to measure the "before".
//! Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_testing::*;
use ambit_tests::ztunnel::*;
use ambit_tests::{exec_in, in_netns, Pod, ReplyServer, Topology};
use anyhow::{bail, Context};

/// Connections of the junk flood, split over 15008 and 15006. The issue asks for 100,000; on
/// 2 shared cores that takes ~25 s here, which is the budget for this test.
const JUNK_CONNECTIONS: usize = 100_000;
/// Plaintext connections the non-mesh pod opens and holds.
const HELD_CONNECTIONS: usize = 10_000;
/// Self-dial attempts (one would loop forever without the fix).
const SELF_DIALS: usize = 200;
/// Connections to 15008 that never start their handshake, held during the junk flood.
const SLOW_HANDSHAKES: usize = 500;

// The caps under test, small so they trigger at once.
const POD_CONNECTIONS: u64 = 200;
const NODE_CONNECTIONS: u64 = 1000;
const POD_HANDSHAKES: u64 = 16;
const NODE_HANDSHAKES: u64 = 64;
const FIRST_BYTE_SECONDS: u64 = 2;
const IDLE_SECONDS: u64 = 3;

/// The descriptors ztunnel may hold beyond its baseline: two per connection under the node
/// cap, one per handshake in progress, and slack for pooled HBONE connections and the ops ports.
const FD_BOUND_OVER_BASELINE: u64 = 2 * NODE_CONNECTIONS + NODE_HANDSHAKES + 64;
/// RSS ztunnel may add over its baseline under attack: the caps bound the connections at
/// once (each under 100 KiB: two 16 KiB copy buffers, a 64 KiB TLS read buffer during a
/// handshake, task and socket state), so 1000 x 100 KiB, rounded up.
const RSS_BOUND_OVER_BASELINE_KB: u64 = 128 * 1024;
/// How far over its baseline ztunnel's RSS may stay once an attack is over: the target.
const AFTER_RSS_PERCENT: u64 = 20;
/// p99 during an attack may be 2x the p99 before, or this, whichever is larger: on a 2-core
/// machine that also runs the attacker, a few scheduling delays set the tail.
const P99_FLOOR: Duration = Duration::from_millis(250);

/// The attack tests share two cores: run them one at a time, so one's flood is not
/// another's baseline.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The ztunnel process under attack.
struct Ztunnel {
    proc: Proc,
    metrics: SocketAddr,
    readiness: SocketAddr,
}

impl Ztunnel {
    fn spawn(dir: &Path, netns_dir: &Path) -> anyhow::Result<Self> {
        let (m, r, a) = (free_port()?, free_port()?, free_port()?);
        let bin = std::env::var_os("AMBIT_ZTUNNEL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| ambit_tests::workspace_bin("ztunnel"));
        let mut command = Command::new(bin);
        command
            .args(["--node", "n1"])
            .arg("--static-state")
            .arg(dir.join("state.yaml"))
            .arg("--local-ca-cert")
            .arg(dir.join("ca.pem"))
            .arg("--local-ca-key")
            .arg(dir.join("ca-key.pem"))
            .arg("--netns-dir")
            .arg(netns_dir)
            .args(["--metrics-addr", &format!("127.0.0.1:{m}")])
            .args(["--readiness-addr", &format!("127.0.0.1:{r}")])
            .args(["--admin-addr", &format!("127.0.0.1:{a}")])
            .args(["--drain-seconds", "1", "--log-format", "json"])
            .env("AMBIT_POD_CONNECTION_LIMIT", POD_CONNECTIONS.to_string())
            .env("AMBIT_NODE_CONNECTION_LIMIT", NODE_CONNECTIONS.to_string())
            .env("AMBIT_POD_HANDSHAKE_LIMIT", POD_HANDSHAKES.to_string())
            .env("AMBIT_NODE_HANDSHAKE_LIMIT", NODE_HANDSHAKES.to_string())
            .env(
                "AMBIT_FIRST_BYTE_TIMEOUT_SECONDS",
                FIRST_BYTE_SECONDS.to_string(),
            )
            .env(
                "AMBIT_PLAINTEXT_IDLE_TIMEOUT_SECONDS",
                IDLE_SECONDS.to_string(),
            )
            .env_remove("RUST_LOG");
        Ok(Ztunnel {
            proc: Proc::start(command, dir.join("ztunnel.log"))?,
            metrics: SocketAddr::from(([127, 0, 0, 1], m)),
            readiness: SocketAddr::from(([127, 0, 0, 1], r)),
        })
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.proc
            .wait_http_ok(self.readiness, "/healthz/ready")
            .context("ztunnel not ready")
    }

    /// Open descriptors, from /proc.
    fn fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count() as u64)
            .unwrap_or(0)
    }

    /// Resident set size in KiB, from /proc.
    fn rss_kb(&self) -> u64 {
        status_kb(self.pid(), "VmRSS:")
    }

    /// Lines of its log that mention `needle`.
    fn log_lines_with(&self, needle: &str) -> usize {
        self.proc
            .logs()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// A counter of the metrics endpoint, summed over series whose labels include `label`.
    fn counter(&self, name: &str, label: &str) -> anyhow::Result<u64> {
        let (_, body) = http_get(self.metrics, "/metrics")?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// One node with ztunnel: `attacked` (enrolled, an app on 8080), `victim` and `srv` (enrolled;
/// the victim's traffic to srv is what must keep working) and `outsider` (not in the mesh).
struct Scene {
    zt: Ztunnel,
    attacked: Pod,
    victim: Pod,
    outsider: Pod,
    srv_addr: SocketAddr,
    attacked_addr: SocketAddr,
    _apps: Vec<ReplyServer>,
    dir: PathBuf,
    // Dropped last: the namespaces.
    _topo: Topology,
}

impl Scene {
    async fn start(test: &str) -> anyhow::Result<Option<Scene>> {
        let Some(topo) = Topology::builder(test)
            .node("n1")
            .pod("attacked", "n1")
            .pod("victim", "n1")
            .pod("srv", "n1")
            .pod("outsider", "n1")
            .build_or_skip()
        else {
            return Ok(None);
        };
        let pod = |name: &str| topo.pod(name).clone();
        let (attacked, victim, srv, outsider) =
            (pod("attacked"), pod("victim"), pod("srv"), pod("outsider"));
        let dir = std::env::temp_dir().join(format!("ambit-{}-attack", topo.prefix()));
        std::fs::create_dir_all(&dir)?;
        TestCa::new(Duration::from_secs(3600)).write_files(&dir)?;
        std::fs::write(
            dir.join("state.yaml"),
            format!(
                "workloads:\n{}{}{}{}",
                workload(&attacked, "app", "attacked", "n1", true),
                workload(&victim, "app", "victim", "n1", true),
                workload(&srv, "app", "srv", "n1", true),
                workload(&outsider, "legacy", "default", "n1", false),
            ),
        )?;
        let apps = vec![
            ReplyServer::start(&srv, 8080)?,
            ReplyServer::start(&attacked, 8080)?,
        ];
        let (srv_addr, attacked_addr) = (apps[0].addr(), apps[1].addr());
        let (d, netns_dir) = (dir.clone(), topo.netns_dir().to_path_buf());
        let zt = blocking(move || {
            let mut zt = Ztunnel::spawn(&d, &netns_dir)?;
            zt.wait_ready()?;
            Ok(zt)
        })
        .await?;
        let enrolled = [attacked.clone(), victim.clone(), srv.clone()];
        eventually("capture rules in the enrolled pods", || {
            enrolled.iter().all(captured)
        })
        .await?;
        Ok(Some(Scene {
            zt,
            attacked,
            victim,
            outsider,
            srv_addr,
            attacked_addr,
            _apps: apps,
            dir,
            _topo: topo,
        }))
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the victim saw over a run of connect+echo round trips.
#[derive(Debug, Default)]
struct Probe {
    ok: usize,
    failed: usize,
    latencies: Vec<Duration>,
    first_error: Option<String>,
}

impl Probe {
    fn p99(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get((l.len() * 99 / 100).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }

    fn success(&self) -> f64 {
        let total = self.ok + self.failed;
        if total == 0 {
            return 0.0;
        }
        100.0 * self.ok as f64 / total as f64
    }
}

/// One round trip from `pod` to the reply server at `dst`: connect, greeting, echo.
fn round_trip_once(pod: &Pod, dst: SocketAddr) -> anyhow::Result<()> {
    let mut s = ambit_tests::connect_from(pod, dst)?;
    ambit_tests::read_greeting(&mut s)?;
    let back = ambit_tests::echo(&mut s, b"still-working")?;
    if back != b"still-working" {
        bail!("echo came back different");
    }
    Ok(())
}

/// Round trips until `stop` is set (and at least `min` of them).
fn probe(pod: &Pod, dst: SocketAddr, min: usize, stop: &AtomicBool) -> Probe {
    let mut p = Probe::default();
    while p.ok + p.failed < min || !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        match round_trip_once(pod, dst) {
            Ok(()) => {
                p.ok += 1;
                p.latencies.push(t.elapsed());
            }
            Err(e) => {
                p.failed += 1;
                p.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    p
}

/// Peaks of ztunnel's descriptors and RSS, sampled until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<(u64, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new((0, 0)));
        let thread = std::thread::spawn({
            let (stop, peaks) = (stop.clone(), peaks.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
                        .map(|d| d.count() as u64)
                        .unwrap_or(0);
                    let rss = status_kb(pid, "VmRSS:");
                    if let Ok(mut p) = peaks.lock() {
                        p.0 = p.0.max(fds);
                        p.1 = p.1.max(rss);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Sampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    /// (peak descriptors, peak RSS KiB).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peaks.lock().map(|p| *p).unwrap_or((0, 0))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Baseline, attack, aftermath: the figures of one attack and the victim's experience.
struct Report {
    name: &'static str,
    base_fds: u64,
    base_rss: u64,
    peak_fds: u64,
    peak_rss: u64,
    after_fds: u64,
    after_rss: u64,
    before: Probe,
    during: Probe,
}

impl Report {
    fn print(&self) {
        eprintln!(
            "ATTACK {}: fds baseline {} peak {} after {}; RSS KiB baseline {} peak {} after {} \
             ({:+.1}%); victim before: {} ok {} failed p99 {:?}; during: {} ok {} failed \
             ({:.2}% success) p99 {:?}{}",
            self.name,
            self.base_fds,
            self.peak_fds,
            self.after_fds,
            self.base_rss,
            self.peak_rss,
            self.after_rss,
            100.0 * (self.after_rss as f64 - self.base_rss as f64) / self.base_rss.max(1) as f64,
            self.before.ok,
            self.before.failed,
            self.before.p99(),
            self.during.ok,
            self.during.failed,
            self.during.success(),
            self.during.p99(),
            self.during
                .first_error
                .as_ref()
                .map(|e| format!("; first victim error: {e}"))
                .unwrap_or_default(),
        );
    }

    /// What the victims must see, whatever the attack.
    fn check(&self) {
        self.print();
        assert_eq!(
            self.during.failed, 0,
            "{}: the victim's connections failed during the attack: {:?}",
            self.name, self.during.first_error
        );
        assert!(
            self.during.ok > 0,
            "{}: the victim made no connection",
            self.name
        );
        let bound = (self.before.p99() * 2).max(P99_FLOOR);
        assert!(
            self.during.p99() <= bound,
            "{}: victim p99 {:?} during the attack, over {bound:?} (2x {:?} before)",
            self.name,
            self.during.p99(),
            self.before.p99()
        );
        assert!(
            self.peak_fds <= self.base_fds + FD_BOUND_OVER_BASELINE,
            "{}: ztunnel held {} descriptors (baseline {}, bound +{FD_BOUND_OVER_BASELINE})",
            self.name,
            self.peak_fds,
            self.base_fds
        );
        assert!(
            self.peak_rss <= self.base_rss + RSS_BOUND_OVER_BASELINE_KB,
            "{}: ztunnel RSS peaked at {} KiB (baseline {}, bound +{RSS_BOUND_OVER_BASELINE_KB})",
            self.name,
            self.peak_rss,
            self.base_rss
        );
        assert!(
            self.after_rss * 100 <= self.base_rss * (100 + AFTER_RSS_PERCENT),
            "{}: ztunnel RSS {} KiB after the attack, more than {AFTER_RSS_PERCENT}% over its baseline {}",
            self.name,
            self.after_rss,
            self.base_rss
        );
    }
}

/// Warms up (so the baseline includes the pooled HBONE connection, TLS configs, the runtime's
/// threads), then measures the baseline and the victim's latency before the attack.
async fn baseline(scene: &Scene) -> anyhow::Result<(u64, u64, Probe)> {
    let (victim, srv) = (scene.victim.clone(), scene.srv_addr);
    let before = blocking(move || {
        let stop = AtomicBool::new(true);
        probe(&victim, srv, 50, &stop);
        Ok(probe(&victim, srv, 200, &stop))
    })
    .await?;
    anyhow::ensure!(
        before.failed == 0,
        "the victim fails before any attack: {:?}",
        before.first_error
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((scene.zt.fds(), scene.zt.rss_kb(), before))
}

/// Runs `attack` on a blocking thread while the victim probes and the sampler watches; then
/// waits for ztunnel to settle (descriptors back near the baseline, RSS within 20%).
async fn under_attack<T: Send + 'static>(
    scene: &Scene,
    name: &'static str,
    attack: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<(Report, T)> {
    let (base_fds, base_rss, before) = baseline(scene).await?;
    let sampler = Sampler::start(scene.zt.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let victim = {
        let (victim, srv, stop) = (scene.victim.clone(), scene.srv_addr, stop.clone());
        tokio::task::spawn_blocking(move || probe(&victim, srv, 20, &stop))
    };
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(attack).await;
    let attack_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = victim.await?;
    let outcome = outcome??;
    let (peak_fds, peak_rss) = sampler.finish();
    eprintln!("ATTACK {name}: attack ran for {attack_time:?}");
    // Settle: closed connections are reaped, the allocator returns freed pages. The victim
    // keeps calling meanwhile, as a node's pods do: the allocator runs its delayed purges when
    // a thread allocates, so only a ztunnel with no traffic at all keeps freed pages longer.
    let deadline = Instant::now() + Duration::from_secs(15);
    let settled = |zt: &Ztunnel| zt.fds() <= base_fds + 8 && zt.rss_kb() * 100 <= base_rss * 120;
    while !settled(&scene.zt) && Instant::now() < deadline {
        let (victim, srv) = (scene.victim.clone(), scene.srv_addr);
        let _ = tokio::task::spawn_blocking(move || round_trip_once(&victim, srv)).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let report = Report {
        name,
        base_fds,
        base_rss,
        peak_fds: peak_fds.max(base_fds),
        peak_rss: peak_rss.max(base_rss),
        after_fds: scene.zt.fds(),
        after_rss: scene.zt.rss_kb(),
        before,
        during,
    };
    Ok((report, outcome))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_dial_from_an_enrolled_pod_is_reset_at_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(scene) = Scene::start("zt_selfdial").await? else {
        return Ok(());
    };
    let attacker = scene.attacked.clone();
    let ip = IpAddr::V4(attacker.ip);
    let (report, resets) = under_attack(&scene, "self-dial", move || {
        // Loopback and the pod's own address, on each of ztunnel's listeners in the pod.
        let targets: Vec<SocketAddr> = [
            (IpAddr::V4(Ipv4Addr::LOCALHOST), 15001),
            (ip, 15001),
            (ip, 15006),
            (IpAddr::V4(Ipv4Addr::LOCALHOST), 15006),
        ]
        .into_iter()
        .map(SocketAddr::from)
        .collect();
        in_netns(&attacker.netns, move || {
            let mut closed_at_once = 0;
            let mut not = Vec::new();
            for i in 0..SELF_DIALS {
                let dst = targets[i % targets.len()];
                let mut s = match TcpStream::connect_timeout(&dst, Duration::from_secs(2)) {
                    Ok(s) => s,
                    // Nothing listens there (15001 is on loopback only), or ztunnel's reset
                    // beat the end of connect: nothing served either way.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused
                                | std::io::ErrorKind::ConnectionReset
                        ) =>
                    {
                        closed_at_once += 1;
                        continue;
                    }
                    Err(e) => {
                        not.push(format!("{dst}: connect: {e}"));
                        continue;
                    }
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"x");
                let mut buf = [0u8; 64];
                // Refused: reset or closed without a byte, well before the read timeout.
                let t = Instant::now();
                let read = s.read(&mut buf);
                if matches!(read, Ok(0) | Err(_)) && t.elapsed() < Duration::from_secs(1) {
                    closed_at_once += 1;
                } else {
                    not.push(format!("{dst}: {read:?} after {:?}", t.elapsed()));
                }
            }
            if !not.is_empty() {
                eprintln!("ATTACK self-dial: not closed at once: {not:?}");
            }
            closed_at_once
        })
    })
    .await?;
    report.check();
    assert_eq!(resets, SELF_DIALS, "every self-dial must be closed at once");
    // The ones to 127.0.0.1:15001 are the loop: each refused as a self-dial, counted exactly.
    // 15006 (loopback or the pod's own address) is refused by the inbound decision, as a
    // destination that is one of ztunnel's ports; the pod's own address on 15001 has no
    // listener (it is on loopback only).
    let counted = scene.zt.counter(
        "ambit_ztunnel_connections_refused_total",
        "reason=\"self_dial\"",
    )?;
    eprintln!("ATTACK self-dial: {counted} counted as self_dial");
    assert_eq!(counted, (SELF_DIALS / 4) as u64, "self-dials counted");
    let lines = scene.zt.log_lines_with("self_dial");
    assert!(lines <= 2, "{lines} log lines for {counted} self-dials");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_mesh_pod_holding_thousands_of_connections_hits_only_its_target_cap(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(scene) = Scene::start("zt_hold").await? else {
        return Ok(());
    };
    let (outsider, dst) = (scene.outsider.clone(), scene.attacked_addr);
    let (report, (held, greeted)) = under_attack(&scene, "hold", move || {
        let held = in_netns(&outsider.netns, move || {
            let mut held = Vec::with_capacity(HELD_CONNECTIONS);
            for _ in 0..HELD_CONNECTIONS {
                if let Ok(s) = TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
                    held.push(s);
                }
            }
            held
        })?;
        // Hold them past the idle timeout: the ones ztunnel served must be closed by it.
        let mut greeted = 0;
        for s in &held {
            let _ = s.set_nonblocking(true);
            let mut buf = [0u8; 128];
            if matches!((&*s).read(&mut buf), Ok(n) if n > 0) {
                greeted += 1;
            }
        }
        std::thread::sleep(Duration::from_secs(IDLE_SECONDS + 2));
        Ok((held, greeted))
    })
    .await?;
    let refused = scene.zt.counter(
        "ambit_ztunnel_connections_refused_total",
        "reason=\"pod_connections\"",
    )?;
    eprintln!(
        "ATTACK hold: {} of {HELD_CONNECTIONS} connected, {greeted} reached the app (pod cap \
         {POD_CONNECTIONS}); refused by the cap: {refused}",
        held.len(),
    );
    report.check();
    // The attacked pod's cap held: at most that many served at once (two descriptors each;
    // more than that may be greeted over the attack, as the idle timeout frees places), plus
    // the victim's few connections in flight.
    assert!(
        report.peak_fds <= report.base_fds + 2 * POD_CONNECTIONS + 32,
        "ztunnel held {} descriptors (baseline {}): more than the pod cap of {POD_CONNECTIONS}",
        report.peak_fds,
        report.base_fds
    );
    // Still held by the attacker, yet ztunnel let go of them (idle timeout, resets).
    assert!(
        report.after_fds <= report.base_fds + 8,
        "ztunnel still holds {} descriptors (baseline {}) while the attacker holds its sockets",
        report.after_fds,
        report.base_fds
    );
    let lines = scene.zt.log_lines_with(&format!("{}:", scene.outsider.ip));
    eprintln!("ATTACK hold: {lines} log lines name the attacker");
    // Each connection ztunnel served has its one access-log line, and how many it served
    // depends on how fast the attack ran (the idle timeout frees places under the cap); the
    // thousands it refused must not each have one: at most one line per ten refusals in all.
    assert!(
        refused >= 1000 && lines as u64 * 10 <= refused,
        "{lines} log lines for the attacker, with {refused} connections refused"
    );
    drop(held);
    Ok(())
}

/// Junk to `dst` from inside `pod`: connect, send garbage, wait for ztunnel to close, reset.
fn junk(pod: &Pod, dst: SocketAddr, count: usize) -> anyhow::Result<(usize, usize)> {
    in_netns(&pod.netns, move || {
        let (mut connected, mut failed) = (0, 0);
        for _ in 0..count {
            match TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
                Ok(mut s) => {
                    connected += 1;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = s.write_all(b"\x16\x03\x01junk-that-is-not-a-client-hello\r\n\r\n");
                    let mut buf = [0u8; 256];
                    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
                Err(_) => failed += 1,
            }
        }
        (connected, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_flood_on_15008_and_15006_leaves_the_node_serving() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(scene) = Scene::start("zt_junk").await? else {
        return Ok(());
    };
    // The attacker's side needs a wide port range: 100,000 connections from one address.
    exec_in(
        &scene.outsider.netns,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65000",
        ],
    )?;
    let ip = IpAddr::V4(scene.attacked.ip);
    let outsider = scene.outsider.clone();
    let (report, (counts, silent)) = under_attack(&scene, "junk flood", move || {
        // First, connections to 15008 that never say a word (a slow handshake each), held
        // through the flood: the handshake caps admit a few, the rest are reset.
        let hbone = SocketAddr::new(ip, 15008);
        let silent = in_netns(&outsider.netns, move || {
            (0..SLOW_HANDSHAKES)
                .filter_map(|_| TcpStream::connect_timeout(&hbone, Duration::from_secs(1)).ok())
                .collect::<Vec<_>>()
        })?;
        let per_port = JUNK_CONNECTIONS / 2;
        let threads: Vec<_> = [15008, 15006]
            .into_iter()
            .map(|port| {
                let pod = outsider.clone();
                std::thread::spawn(move || junk(&pod, SocketAddr::new(ip, port), per_port))
            })
            .collect();
        let mut counts = Vec::new();
        for t in threads {
            counts.push(
                t.join()
                    .map_err(|_| anyhow::anyhow!("junk thread panicked"))??,
            );
        }
        Ok((counts, silent))
    })
    .await?;
    let over_handshake_cap = scene.zt.counter(
        "ambit_ztunnel_connections_refused_total",
        "reason=\"pod_handshakes\"",
    )?;
    eprintln!(
        "ATTACK junk flood: {} silent handshakes held, {over_handshake_cap} reset over the pod's \
         handshake cap ({POD_HANDSHAKES})",
        silent.len()
    );
    assert!(
        over_handshake_cap >= (SLOW_HANDSHAKES - POD_HANDSHAKES as usize) as u64,
        "{over_handshake_cap} connections refused over the handshake cap"
    );
    drop(silent);
    let handshakes = scene
        .zt
        .counter("ambit_ztunnel_hbone_handshakes_failed_total", "reason=")?;
    let refused = scene
        .zt
        .counter("ambit_ztunnel_connections_refused_total", "reason=")?;
    eprintln!(
        "ATTACK junk flood: 15008 {:?} / 15006 {:?} (connected, failed); ztunnel counted \
         {handshakes} failed handshakes, {refused} refused at a cap",
        counts[0], counts[1]
    );
    report.check();
    let lines = scene.zt.log_lines_with(&format!("{}:", scene.outsider.ip));
    eprintln!("ATTACK junk flood: {lines} log lines name the attacker");
    // One line per cause per 5 s: a few causes over the flood's seconds, not one per junk
    // connection.
    assert!(lines <= 100, "{lines} log lines for a junk flood");
    // The exact figure is in the metrics.
    assert!(
        handshakes + refused >= (counts[0].0 as u64) * 9 / 10,
        "15008: {} junk connections, {handshakes} failed handshakes + {refused} refusals counted",
        counts[0].0
    );
    Ok(())
}
