//! Pod-to-pod across two nodes through two real `ztunnel` processes (HBONE, mTLS) versus the
//! direct path between the *same* pods un-enrolled, measured in one run:
//!
//! - bulk: one connection sends `--bulk-mib` MiB one way to a sink that answers with the count
//!   at EOF (MB/s);
//! - ping-pong: `--pings` round trips of 64 bytes on one connection (p50/p99 µs);
//! - connect: `--connects` sequential new connections, each with a 1-byte round trip so the
//!   tunnel is really up (connections/s);
//! - UDP (the ztunnels capture the server's address, `--udp-capture-cidrs`, so the mesh
//!   carries it over CONNECT-UDP): ping-pong of `--udp-pings` 64-byte datagrams (p50/p99 µs),
//!   and echo throughput: `--udp-mib` MiB in `--udp-size`-byte datagrams with
//!   `--udp-window` in flight (MB/s one way, and the datagrams lost);
//! - ztunnel CPU (`/proc/<pid>/stat` of both processes) during bulk and ping-pong, and RSS
//!   (`/proc/<pid>/status`) idle and with `--idle` open idle connections (RSS per connection,
//!   each side's ztunnel separately). `--idle 100000` is the memory-per-connection figure: the
//!   harness raises its descriptor limit (the ztunnels inherit it) and their connection caps to
//!   fit, and spreads the connections over several server ports, because one (source address,
//!   destination address and port) triple has only the ~28,000 ports of the ephemeral range.
//!
//! A measurement, not a test: nothing asserts on timing. Needs root (namespaces, iptables).
//! Build ztunnel in the same profile first, e.g.
//! `cargo build --release -p ambit-ztunnel --bin ztunnel && cargo run --release -p ambit-bench --bin ztunnel_pods`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_bench::{mb_per_s, micros, print_table, Row, Samples};
use ambit_hbone::ca::CertificateAuthority;
use ambit_testing::wait;
use ambit_tests::ztunnel::captured;
use ambit_tests::{in_netns, Pod, Topology};
use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// MiB sent one way in the bulk test.
    #[arg(long, default_value_t = 256)]
    bulk_mib: u64,
    /// 64-byte round trips in the latency test (after 500 warm-up ones).
    #[arg(long, default_value_t = 10_000)]
    pings: usize,
    /// New connections in the connect test.
    #[arg(long, default_value_t = 1_000)]
    connects: usize,
    /// Idle connections held open for the memory measurement.
    #[arg(long, default_value_t = 1_000)]
    idle: usize,
    /// 64-byte UDP round trips in the UDP latency test (after 500 warm-up ones).
    #[arg(long, default_value_t = 10_000)]
    udp_pings: usize,
    /// MiB echoed in the UDP throughput test.
    #[arg(long, default_value_t = 64)]
    udp_mib: u64,
    /// Payload bytes per datagram in the UDP throughput test.
    #[arg(long, default_value_t = 1200)]
    udp_size: usize,
    /// Datagrams in flight in the UDP throughput test.
    #[arg(long, default_value_t = 32)]
    udp_window: usize,
    /// The ztunnel binary (default: beside this one).
    #[arg(long)]
    ztunnel: Option<PathBuf>,
}

const ECHO_PORT: u16 = 9000;
const SINK_PORT: u16 = 9001;
/// First port of the idle-connection holders; each takes [`CONNS_PER_HOLD_PORT`].
const HOLD_PORT: u16 = 9100;
const CONNS_PER_HOLD_PORT: usize = 20_000;

fn hold_ports(idle: usize) -> u16 {
    idle.div_ceil(CONNS_PER_HOLD_PORT).max(1) as u16
}

/// Listeners in `pod` that greet each connection with one byte (so the client knows the
/// tunnel is up end to end), keep it, and close it at the client's EOF, on one thread with a
/// task per connection: 100,000 held connections must not cost 100,000 stacks in the harness.
fn start_holders(pod: &Pod, ports: u16) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for port in HOLD_PORT..HOLD_PORT + ports {
        let l = in_netns(&pod.netns, move || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        })??;
        l.set_nonblocking(true)?;
        listeners.push(l);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            for l in listeners {
                let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                    continue;
                };
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = l.accept().await {
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            if s.write_all(b"h").await.is_ok() {
                                let mut b = [0u8; 1];
                                while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                            }
                        });
                    }
                });
            }
            std::future::pending::<()>().await
        })
    });
    Ok(())
}

/// Raises this process's descriptor limit (the ztunnels it starts inherit it) to hold `idle`
/// connections: two descriptors each in the harness (client and server end), one in each
/// ztunnel, plus headroom. Raising the hard limit needs CAP_SYS_RESOURCE; without it the soft
/// limit goes up to the hard one, and a count that cannot fit is refused before anything runs.
fn raise_nofile(idle: usize) -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")?
        .trim()
        .parse()
        .context("/proc/sys/fs/nr_open")?;
    let need = 2 * idle as u64 + 2_048;
    let want = (need + 63_488).max(soft).max(hard).min(nr_open);
    let got = match setrlimit(Resource::RLIMIT_NOFILE, want, want) {
        Ok(()) => want,
        Err(_) => {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
                .with_context(|| format!("cannot raise RLIMIT_NOFILE to its hard limit {hard}"))?;
            hard
        }
    };
    if got < need {
        bail!(
            "--idle {idle} needs {need} descriptors but the limit is {got} and cannot be raised \
             (raising the hard limit needs CAP_SYS_RESOURCE); use --idle {} or less here",
            (got.saturating_sub(2_048)) / 2
        );
    }
    Ok(got)
}
const UDP_ECHO_PORT: u16 = 9002;

/// Echo and sink servers listening inside `pod` (threads; sockets stay in the pod).
fn start_servers(pod: &Pod) -> anyhow::Result<()> {
    let (echo, sink) = in_netns(&pod.netns, || {
        Ok::<_, std::io::Error>((
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT))?,
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, SINK_PORT))?,
        ))
    })??;
    std::thread::spawn(move || {
        for mut s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let udp = in_netns(&pod.netns, || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_ECHO_PORT))
    })??;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    std::thread::spawn(move || {
        for mut s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1024 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes());
            });
        }
    });
    Ok(())
}

fn bulk(dst: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(dst)?;
    let chunk = vec![0x5au8; 1024 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    if u64::from_be_bytes(count) != bytes {
        bail!(
            "sink counted {} of {bytes} bytes",
            u64::from_be_bytes(count)
        );
    }
    Ok(start.elapsed())
}

fn ping_pong(dst: SocketAddr, n: usize) -> anyhow::Result<Samples> {
    let mut s = TcpStream::connect(dst)?;
    s.set_nodelay(true)?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Samples::with_capacity(n);
    for i in 0..n + 500 {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= 500 {
            samples.record(t.elapsed());
        }
    }
    Ok(samples)
}

fn udp_socket(dst: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(dst)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

/// 64-byte datagram round trips; a lost one is sent again (and its time not recorded).
fn udp_ping_pong(dst: SocketAddr, n: usize) -> anyhow::Result<Samples> {
    let s = udp_socket(dst)?;
    let msg = [7u8; 64];
    let mut back = [0u8; 128];
    let mut samples = Samples::with_capacity(n);
    let mut done = 0;
    while done < n + 500 {
        let t = Instant::now();
        s.send(&msg)?;
        match s.recv(&mut back) {
            Ok(_) => {
                if done >= 500 {
                    samples.record(t.elapsed());
                }
                done += 1;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(samples)
}

/// What the UDP echo throughput test measured.
struct UdpBulk {
    elapsed: Duration,
    echoed: u64,
    lost: u64,
}

/// Echoes `bytes` in `size`-byte datagrams with up to `window` in flight; a read timeout
/// counts what is in flight as lost and refills the window.
fn udp_bulk(dst: SocketAddr, bytes: u64, size: usize, window: usize) -> anyhow::Result<UdpBulk> {
    let s = udp_socket(dst)?;
    let total = (bytes / size as u64).max(1);
    let payload = vec![0x5au8; size];
    let mut buf = vec![0u8; 65536];
    let (mut sent, mut echoed, mut lost) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while echoed + lost < total {
        while sent < total && sent - echoed - lost < window as u64 {
            s.send(&payload)?;
            sent += 1;
        }
        match s.recv(&mut buf) {
            Ok(_) => echoed += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                lost = sent - echoed;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(UdpBulk {
        elapsed: start.elapsed(),
        echoed,
        lost,
    })
}

fn connects(dst: SocketAddr, n: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for _ in 0..n {
        let mut s = TcpStream::connect(dst)?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
    }
    Ok(start.elapsed())
}

fn idle(srv: Ipv4Addr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    (0..n)
        .map(|i| {
            let port = HOLD_PORT + (i / CONNS_PER_HOLD_PORT) as u16;
            let mut s = TcpStream::connect((srv, port))
                .with_context(|| format!("idle connection {i} to port {port}"))?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
                .with_context(|| format!("idle connection {i}: no greeting"))?;
            Ok(s)
        })
        .collect()
}

/// Runs `f` inside the client pod's namespace (so its sockets are the pod's).
fn in_pod<T: Send + 'static>(
    pod: &Pod,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    in_netns(&pod.netns, f)?
}

/// A ztunnel process, stopped on drop.
struct Ztunnel {
    child: Child,
}

impl Ztunnel {
    fn spawn(
        bin: &Path,
        node: &str,
        dir: &Path,
        netns_dir: &Path,
        idle: usize,
        udp_capture: &str,
    ) -> anyhow::Result<Self> {
        // The default caps (4,096 per pod, 32,768 per node) are attack limits; the memory
        // figure needs room for every idle connection.
        let cap = (idle + 4_096).to_string();
        let port = |p: u16| format!("127.0.0.1:{p}");
        let base = if node == "n1" { 25000 } else { 26000 };
        let child = Command::new(bin)
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
            .args(["--metrics-addr", &port(base + 20)])
            .args(["--readiness-addr", &port(base + 21)])
            .args(["--admin-addr", &port(base)])
            .args(["--udp-capture-cidrs", udp_capture])
            .args(["--log-level", "warn"])
            .args([
                "--pod-connection-limit",
                &cap,
                "--node-connection-limit",
                &cap,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Ztunnel { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        // SIGTERM lets it remove its rules; then make sure it is gone.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().context("bad stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // USER_HZ is 100 on every Linux architecture we run on.
    Ok(ticks / 100.0)
}

/// Resident set size in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?)
}

/// Connections the ztunnel whose metrics listen on `metrics` accepted as the destination side.
fn inbound_connections(metrics: SocketAddr) -> anyhow::Result<f64> {
    let (status, body) = ambit_testing::http_get(metrics, "/metrics")?;
    if status != 200 {
        bail!("GET {metrics}/metrics: status {status}");
    }
    Ok(body
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn cpu_total(z: &[&Ztunnel]) -> anyhow::Result<f64> {
    z.iter().map(|z| cpu_seconds(z.pid())).sum()
}

fn rss_total(z: &[&Ztunnel]) -> anyhow::Result<f64> {
    z.iter().map(|z| rss_kib(z.pid())).sum()
}

fn state(client: &Pod, srv: &Pod, enrolled: bool) -> String {
    let proto = if enrolled { "HBONE" } else { "TCP" };
    format!(
        "workloads:\n  - {{name: client, namespace: bench, serviceAccount: client, node: n1, addresses: [{}], protocol: {proto}}}\n  - {{name: srv, namespace: bench, serviceAccount: srv, node: n2, addresses: [{}], protocol: {proto}}}\n",
        client.ip, srv.ip
    )
}

struct PathResult {
    bulk: Duration,
    pings: Samples,
    connects: Duration,
    udp_pings: Samples,
    udp_bulk: UdpBulk,
}

fn measure(client: &Pod, srv: &Pod, args: &Args) -> anyhow::Result<PathResult> {
    let (echo, sink) = (
        SocketAddr::new(srv.ip.into(), ECHO_PORT),
        SocketAddr::new(srv.ip.into(), SINK_PORT),
    );
    let bytes = args.bulk_mib * 1024 * 1024;
    let (pings, n_conn) = (args.pings, args.connects);
    let udp = SocketAddr::new(srv.ip.into(), UDP_ECHO_PORT);
    let (udp_pings, udp_bytes) = (args.udp_pings, args.udp_mib * 1024 * 1024);
    let (size, window) = (args.udp_size, args.udp_window);
    Ok(PathResult {
        bulk: in_pod(client, move || bulk(sink, bytes))?,
        pings: in_pod(client, move || ping_pong(echo, pings))?,
        connects: in_pod(client, move || connects(echo, n_conn))?,
        udp_pings: in_pod(client, move || udp_ping_pong(udp, udp_pings))?,
        udp_bulk: in_pod(client, move || udp_bulk(udp, udp_bytes, size, window))?,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = ambit_bench::binary(
        "--ztunnel",
        args.ztunnel.as_deref(),
        "ztunnel",
        "cargo build [--release] -p ambit-ztunnel --bin ztunnel",
    )?;
    let Some(topo) = Topology::client_and_server("zt_bench").build_or_skip() else {
        bail!("needs root");
    };
    let (client, srv) = (topo.pod("client").clone(), topo.pod("srv").clone());
    start_servers(&srv)?;
    start_holders(&srv, hold_ports(args.idle))?;
    let nofile = raise_nofile(args.idle)?;
    let dir = std::env::temp_dir().join(format!("ambit-{}-bench", topo.prefix()));
    std::fs::create_dir_all(&dir)?;
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(86400))?;
    let pem = ca.to_pem();
    std::fs::write(dir.join("ca.pem"), &pem.cert_pem)?;
    std::fs::write(dir.join("ca-key.pem"), &pem.key_pem)?;
    std::fs::write(dir.join("state.yaml"), state(&client, &srv, false))?;
    let udp_capture = format!("{}/32", srv.ip);
    let z1 = Ztunnel::spawn(&bin, "n1", &dir, topo.netns_dir(), args.idle, &udp_capture)?;
    let z2 = Ztunnel::spawn(&bin, "n2", &dir, topo.netns_dir(), args.idle, &udp_capture)?;
    let both = [&z1, &z2];
    std::thread::sleep(Duration::from_millis(500));

    println!(
        "measuring direct path (pods un-enrolled, ztunnels running idle) with {} MiB, {} pings, {} connects",
        args.bulk_mib, args.pings, args.connects
    );
    let mut direct = measure(&client, &srv, &args)?;

    // Enroll both pods: the ztunnels re-read the file and capture them.
    std::fs::write(dir.join("state.yaml"), state(&client, &srv, true))?;
    for pod in [&client, &srv] {
        wait("capture rules", || Ok(captured(pod)))?;
    }
    let echo = SocketAddr::new(srv.ip.into(), ECHO_PORT);
    wait("a first tunnel", || {
        Ok(in_pod(&client, move || {
            let mut s = TcpStream::connect(echo)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(())
        })
        .is_ok())
    })?;
    let rss_idle = rss_total(&both)?;
    println!("measuring through two ztunnels (HBONE)");
    let cpu0 = cpu_total(&both)?;
    let bytes = args.bulk_mib * 1024 * 1024;
    let sink = SocketAddr::new(srv.ip.into(), SINK_PORT);
    let mesh_bulk = in_pod(&client, move || bulk(sink, bytes))?;
    let cpu1 = cpu_total(&both)?;
    let pings = args.pings;
    let mut mesh_pings = in_pod(&client, move || ping_pong(echo, pings))?;
    let cpu2 = cpu_total(&both)?;
    let n_conn = args.connects;
    let mesh_connects = in_pod(&client, move || connects(echo, n_conn))?;
    let cpu3 = cpu_total(&both)?;
    println!("measuring UDP through two ztunnels (CONNECT-UDP)");
    let udp = SocketAddr::new(srv.ip.into(), UDP_ECHO_PORT);
    let udp_pings = args.udp_pings;
    let mut mesh_udp_pings = in_pod(&client, move || udp_ping_pong(udp, udp_pings))?;
    let cpu4 = cpu_total(&both)?;
    let (udp_bytes, size, window) = (args.udp_mib * 1024 * 1024, args.udp_size, args.udp_window);
    let mesh_udp_bulk = in_pod(&client, move || udp_bulk(udp, udp_bytes, size, window))?;
    let cpu5 = cpu_total(&both)?;

    let n_idle = args.idle;
    let before = [rss_kib(z1.pid())?, rss_kib(z2.pid())?];
    println!("opening {n_idle} idle connections (descriptor limit {nofile})");
    let srv_ip = srv.ip;
    let opened = Instant::now();
    let held = in_pod(&client, move || idle(srv_ip, n_idle))?;
    let opened = opened.elapsed();
    // Let both ztunnels settle (the last streams' buffers, the allocator's deferred frees).
    std::thread::sleep(Duration::from_secs(2));
    let with = [rss_kib(z1.pid())?, rss_kib(z2.pid())?];
    // The figures mean something only if the connections really went through the tunnel.
    let tunnelled = inbound_connections(SocketAddr::from(([127, 0, 0, 1], 26020)))?;
    let expected = (n_idle + args.connects) as f64;
    if tunnelled < expected {
        bail!("the server side's ztunnel counted {tunnelled} inbound connections, expected at least {expected}: the mesh path did not go through it");
    }
    drop(held);
    // The allocator hands freed pages back after a delay; give it time before the last look.
    std::thread::sleep(Duration::from_secs(8));
    let after = [rss_kib(z1.pid())?, rss_kib(z2.pid())?];
    let gb = bytes as f64 / 1e9;
    let rows = vec![
        Row {
            metric: "bulk MB/s".into(),
            direct: mb_per_s(bytes, direct.bulk),
            measured: mb_per_s(bytes, mesh_bulk),
        },
        Row {
            metric: "ping-pong p50 µs".into(),
            direct: micros(direct.pings.percentile(50.0)),
            measured: micros(mesh_pings.percentile(50.0)),
        },
        Row {
            metric: "ping-pong p99 µs".into(),
            direct: micros(direct.pings.percentile(99.0)),
            measured: micros(mesh_pings.percentile(99.0)),
        },
        Row {
            metric: "new connections/s".into(),
            direct: args.connects as f64 / direct.connects.as_secs_f64(),
            measured: args.connects as f64 / mesh_connects.as_secs_f64(),
        },
        Row {
            metric: "UDP ping-pong p50 µs".into(),
            direct: micros(direct.udp_pings.percentile(50.0)),
            measured: micros(mesh_udp_pings.percentile(50.0)),
        },
        Row {
            metric: "UDP ping-pong p99 µs".into(),
            direct: micros(direct.udp_pings.percentile(99.0)),
            measured: micros(mesh_udp_pings.percentile(99.0)),
        },
        Row {
            metric: format!(
                "UDP echo MB/s ({} B, {} in flight)",
                args.udp_size, args.udp_window
            ),
            direct: mb_per_s(
                direct.udp_bulk.echoed * args.udp_size as u64,
                direct.udp_bulk.elapsed,
            ),
            measured: mb_per_s(
                mesh_udp_bulk.echoed * args.udp_size as u64,
                mesh_udp_bulk.elapsed,
            ),
        },
    ];
    print_table(
        "pod -> pod across nodes: direct vs two ztunnels (HBONE)",
        "ztunnel",
        &rows,
    );
    println!();
    println!("ztunnel resources (both processes together)");
    println!(
        "  CPU during bulk:        {:>8.2} s for {:.2} GB ({:.2} CPU-s/GB)",
        cpu1 - cpu0,
        gb,
        (cpu1 - cpu0) / gb
    );
    println!(
        "  CPU during ping-pong:   {:>8.2} s for {} round trips ({:.1} CPU-µs per round trip)",
        cpu2 - cpu1,
        args.pings + 500,
        (cpu2 - cpu1) * 1e6 / (args.pings + 500) as f64
    );
    println!(
        "  CPU during connects:    {:>8.2} s for {} connections ({:.1} CPU-µs per connection)",
        cpu3 - cpu2,
        args.connects,
        (cpu3 - cpu2) * 1e6 / args.connects as f64
    );
    println!(
        "  CPU during UDP ping-pong: {:>7.2} s ({:.1} CPU-µs per round trip); UDP echo: {:.2} s",
        cpu4 - cpu3,
        (cpu4 - cpu3) * 1e6 / (args.udp_pings + 500) as f64,
        cpu5 - cpu4
    );
    println!(
        "  UDP datagrams lost: direct {} of {}, mesh {} of {}",
        direct.udp_bulk.lost,
        direct.udp_bulk.echoed + direct.udp_bulk.lost,
        mesh_udp_bulk.lost,
        mesh_udp_bulk.echoed + mesh_udp_bulk.lost
    );
    println!("  RSS idle (pods enrolled): {:>8.1} MiB", rss_idle / 1024.0);
    println!(
        "  {} idle connections opened in {:.1} s; RSS per ztunnel, MiB (client side / server side):",
        args.idle,
        opened.as_secs_f64()
    );
    let mib = |k: [f64; 2]| format!("{:.1} / {:.1}", k[0] / 1024.0, k[1] / 1024.0);
    let per_conn = |i: usize| (with[i] - before[i]) / args.idle as f64;
    println!("    before:       {}", mib(before));
    println!("    holding them: {}", mib(with));
    println!("    closed again: {}", mib(after));
    println!(
        "  RSS per idle connection: {:.2} KiB client side, {:.2} KiB server side",
        per_conn(0),
        per_conn(1)
    );
    drop((z1, z2));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
