//! Ambit's ztunnel side by side with another ztunnel (Istio's, built from its public source
//! with `--features testing`), in one run on one machine: two network namespaces joined by a
//! veth pair, a client and a server, each side's ztunnel in dedicated mode, and the same
//! standard tools through three paths:
//!
//! - direct: no proxy;
//! - floor: two `floor_relay`s, which only move bytes (no TLS, no HTTP/2) under the same
//!   capture rules: the most any proxy pair could reach on this path and these cores, so
//!   `floor/peer` bounds what a ztunnel could reach against the peer (`--floor-tunnel tls`
//!   puts mutual TLS between them; `--no-floor` skips it);
//! - Ambit: two Ambit ztunnels (HBONE over TLS 1.3 mTLS);
//! - peer: two peer ztunnels (same HBONE wire format), when `--peer-ztunnel` is given.
//!
//! Figures: iperf3 throughput (1 and 4 streams), sockperf ping-pong 64 B (RTT avg/p50/p99 and
//! the latency the mesh adds), wrk against nginx with `Connection: close` (new connections/s)
//! and with keep-alive (requests/s), 1 KB bodies; per proxy pair, CPU-seconds per GB and per
//! connection (`/proc/<pid>/stat`) and RSS idle before and after the runs. Each round runs
//! the paths in the opposite order of the previous one; the table shows the median and the
//! spread (min..max) over rounds, the ratios Ambit/peer and mesh/direct, and the machine's load.
//!
//! A measurement, not a test: nothing asserts on timing. Needs root, iperf3, sockperf, wrk and
//! nginx; `scripts/bench.sh --peer-ztunnel PATH` installs them, builds and runs this.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_bench::dedicated::{http_get, Flavor, FloorTunnel, PeerRules, Settings, ZtunnelPair};
use ambit_bench::pair::{NetnsPair, SERVER_IP};
use ambit_bench::tools::{parse_iperf3, parse_sockperf, parse_wrk, Daemon, Iperf, PingPong, Wrk};
use ambit_bench::{median_spread, proc_cpu_seconds, proc_status_kib};
use ambitctl::local::net;
use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Ambit's ztunnel vs another ztunnel vs no proxy, side by side in one run")]
struct Args {
    /// Another ztunnel binary to measure in the same harness (Istio's settings: FAKE_CA,
    /// LOCAL_XDS_PATH, PROXY_MODE=dedicated); without it the peer is skipped.
    #[arg(long)]
    peer_ztunnel: Option<PathBuf>,
    /// Ambit's ztunnel (default: `ztunnel` beside this binary).
    #[arg(long)]
    ztunnel: Option<PathBuf>,
    /// The floor path's relay (default: `floor_relay` beside this binary).
    #[arg(long)]
    floor_relay: Option<PathBuf>,
    /// How the floor's relays carry bytes between them: `plain` TCP (the least any proxy
    /// pair does) or `tls`, mutual TLS as HBONE's with a handshake per connection (the least a
    /// pair that encrypts does).
    #[arg(long, value_enum, default_value_t = FloorTunnel::Plain)]
    floor_tunnel: FloorTunnel,
    /// Skip the floor path.
    #[arg(long)]
    no_floor: bool,
    /// Rounds; each runs every path once, in the opposite order of the round before.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds each iperf3, sockperf and wrk measurement runs.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Worker threads of every proxy.
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    /// wrk's connections (2 threads).
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Log level of every proxy (`info` adds one access-log line per connection).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Tiny sizes for a smoke run: iperf3 sends 32 MiB per test, sockperf and wrk run 1 s.
    #[arg(long)]
    quick: bool,
    /// The capture rules the harness gives the peer, which installs none of its own:
    /// `mesh`, the same as Ambit's (default), or `redirect`, one nat rule only.
    #[arg(long, value_enum, default_value_t = PeerRules::Mesh)]
    peer_rules: PeerRules,
    /// Also write every figure of every round here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Record both proxies with `perf record` during each 1-stream iperf3 run (or what
    /// `--perf-phase` names), into
    /// `<dir>/<path>-round<N>.data` (read with `perf report -i`), and count their syscalls,
    /// context switches and page faults with `perf stat` into `<path>-round<N>.stat`, so the
    /// profiles of Ambit and the peer come from the same run and the same load.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Which measurement `--perf-dir` records: the 1-stream iperf3 run (`bulk`), the sockperf
    /// ping-pong (`ping-pong`, where the cost is per round trip, not per byte) or wrk with
    /// `Connection: close` (`new-connections`).
    #[arg(long, value_enum, default_value_t = PerfPhase::Bulk)]
    perf_phase: PerfPhase,
    /// How `--perf-dir` records call graphs: `fp` (frame pointers, cheap; Rust release
    /// builds have none, so stacks stop at the first Rust frame) or `dwarf` (whole stacks,
    /// heavier: keep `--seconds` short).
    #[arg(long, default_value = "fp")]
    perf_call_graph: String,
}

/// The measurement `--perf-dir` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PerfPhase {
    Bulk,
    PingPong,
    NewConnections,
}

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const HTTP_PORT: u16 = 8080;

/// One of the measured paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Direct,
    Floor,
    Ambit,
    Peer,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Floor => "floor",
            PathKind::Ambit => "ambit",
            PathKind::Peer => "peer",
        }
    }
}

/// Everything measured on one path in one round.
#[derive(Debug, Clone)]
struct Run {
    one_stream: Iperf,
    four_streams: Iperf,
    ping: PingPong,
    close: Wrk,
    keepalive: Wrk,
    /// The proxies', when there are proxies.
    proxy: Option<ProxyCost>,
}

#[derive(Debug, Clone)]
struct ProxyCost {
    /// CPU seconds of both sides during the two iperf3 runs.
    cpu_iperf: f64,
    /// During the `Connection: close` run.
    cpu_close: f64,
    /// RSS (KiB) of client and server side: ready and idle, before any measurement.
    rss_before: [u64; 2],
    /// Idle again after all measurements.
    rss_after: [u64; 2],
    /// Connections and bytes (both ways) the server side counted: proof the traffic went
    /// through it.
    connections: f64,
    bytes: f64,
}

/// The servers in the server's namespace, shared by every path.
struct Servers {
    _iperf: Daemon,
    _sockperf: Daemon,
    _nginx: Daemon,
}

fn start_servers(pair: &NetnsPair, dir: &Path) -> anyhow::Result<Servers> {
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::create_dir_all(dir.join("nginx-tmp"))?;
    std::fs::write(www.join("1k"), vec![b'a'; 1024])?;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    // One worker: the backend is the same on every path and leaves a core to the proxies.
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nodelay on;\n  keepalive_requests 10000000;\n  keepalive_timeout 60s;\n\
             \x20 default_type application/octet-stream;\n\
             \x20 client_body_temp_path {d}/nginx-tmp/body;\n  proxy_temp_path {d}/nginx-tmp/proxy;\n  fastcgi_temp_path {d}/nginx-tmp/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/nginx-tmp/uwsgi;\n  scgi_temp_path {d}/nginx-tmp/scgi;\n\
             \x20 server {{ listen {HTTP_PORT}; root {}; }}\n}}\n",
            www.display()
        ),
    )?;
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let iperf = Daemon::spawn(
        "iperf3 server",
        &pair.server,
        Path::new("iperf3"),
        &s(&["-s", "-p", &IPERF_PORT.to_string()]),
        &[],
        dir.join("iperf3.log"),
    )?;
    let sockperf = Daemon::spawn(
        "sockperf server",
        &pair.server,
        Path::new("sockperf"),
        &s(&[
            "server",
            "--tcp",
            "-i",
            "0.0.0.0",
            "-p",
            &SOCKPERF_PORT.to_string(),
        ]),
        &[],
        dir.join("sockperf.log"),
    )?;
    let nginx = Daemon::spawn(
        "nginx",
        &pair.server,
        Path::new("nginx"),
        &s(&[
            "-c",
            &conf.display().to_string(),
            "-p",
            &dir.display().to_string(),
            "-e",
            &format!("{d}/nginx-error.log"),
        ]),
        &[],
        dir.join("nginx.log"),
    )?;
    let mut servers = Servers {
        _iperf: iperf,
        _sockperf: sockperf,
        _nginx: nginx,
    };
    // Direct path up: every server answers a connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [IPERF_PORT, SOCKPERF_PORT, HTTP_PORT] {
        loop {
            let up = net::in_netns(&pair.client, move || {
                std::net::TcpStream::connect_timeout(
                    &(SERVER_IP, port).into(),
                    Duration::from_secs(1),
                )
                .is_ok()
            })?;
            if up {
                break;
            }
            for d in [
                &mut servers._iperf,
                &mut servers._sockperf,
                &mut servers._nginx,
            ] {
                d.check_running()?;
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {SERVER_IP}:{port} in {}", pair.server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(servers)
}

/// Runs a tool in the client's namespace; its stdout, or an error with everything it printed.
fn tool(pair: &NetnsPair, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &pair.client])
        .args(args)
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn iperf(pair: &NetnsPair, args: &Args, streams: u32) -> anyhow::Result<Iperf> {
    let (server, port, streams, secs) = (
        SERVER_IP.to_string(),
        IPERF_PORT.to_string(),
        streams.to_string(),
        args.seconds.to_string(),
    );
    let mut cmd = vec!["iperf3", "-c", &server, "-p", &port, "-P", &streams, "-J"];
    if args.quick {
        cmd.extend(["-n", "32M"]);
    } else {
        cmd.extend(["-t", &secs]);
    }
    // iperf3 exits non-zero on failure but still prints its JSON report with the reason.
    let out = Command::new("ip")
        .args(["netns", "exec", &pair.client])
        .args(&cmd)
        .output()
        .context("running iperf3")?;
    let result = parse_iperf3(&String::from_utf8_lossy(&out.stdout))?;
    if result.bytes == 0 {
        bail!("iperf3 delivered no bytes");
    }
    Ok(result)
}

fn sockperf(pair: &NetnsPair, args: &Args) -> anyhow::Result<PingPong> {
    let secs = if args.quick { 1 } else { args.seconds }.to_string();
    let (server, port) = (SERVER_IP.to_string(), SOCKPERF_PORT.to_string());
    let out = tool(
        pair,
        &[
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            &server,
            "-p",
            &port,
            "-m",
            "64",
            "-t",
            &secs,
            "--full-rtt",
        ],
    )?;
    let result = parse_sockperf(&out)?;
    if result.round_trips == 0 {
        bail!("sockperf measured no round trips");
    }
    Ok(result)
}

fn wrk(pair: &NetnsPair, args: &Args, close: bool) -> anyhow::Result<Wrk> {
    let secs = format!("{}s", if args.quick { 1 } else { args.seconds });
    let conns = args.connections.to_string();
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/1k");
    let mut cmd = vec!["wrk", "-t", "2", "-c", &conns, "-d", &secs];
    if close {
        cmd.extend(["-H", "Connection: close"]);
    }
    cmd.push(&url);
    let result = parse_wrk(&tool(pair, &cmd)?)?;
    if result.requests == 0 || result.non_2xx > 0 {
        bail!("wrk got no successful responses ({result:?})");
    }
    Ok(result)
}

fn cpu(pair: &Option<ZtunnelPair>) -> anyhow::Result<f64> {
    match pair {
        Some(p) => Ok(proc_cpu_seconds(p.client.pid())? + proc_cpu_seconds(p.server.pid())?),
        None => Ok(0.0),
    }
}

fn rss(pair: &ZtunnelPair) -> anyhow::Result<[u64; 2]> {
    Ok([
        proc_status_kib(pair.client.pid(), "VmRSS")?,
        proc_status_kib(pair.server.pid(), "VmRSS")?,
    ])
}

/// Waits until an HTTP request from the client reaches nginx over the path (the first one
/// through a mesh also sets up its tunnel and certificates).
fn wait_path(pair: &NetnsPair) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(&pair.client, (SERVER_IP, HTTP_PORT), "/1k") {
            Ok((200, body)) if body.len() == 1024 => return Ok(()),
            other if Instant::now() > deadline => {
                bail!("no response through the path after 30 s: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `perf record` and `perf stat` attached to both proxies of a pair until dropped.
struct Recording(Vec<std::process::Child>);

/// What `perf stat` counts beside the profile: the syscalls that move bytes, wake-ups and
/// page faults, to set against the bytes moved.
const STAT_EVENTS: &str = "task-clock,context-switches,cpu-migrations,page-faults,\
    raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_write,\
    syscalls:sys_enter_readv,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,\
    syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait,\
    syscalls:sys_enter_futex";

impl Recording {
    fn start(proxies: &ZtunnelPair, out: &Path, call_graph: &str) -> anyhow::Result<Recording> {
        let pids = format!("{},{}", proxies.client.pid(), proxies.server.pid());
        let spawn = |cmd: &mut Command| {
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("running perf (Debian's linux-perf)")
        };
        let record = spawn(
            Command::new("perf")
                .args([
                    "record",
                    "--call-graph",
                    call_graph,
                    "-F",
                    "999",
                    "-p",
                    &pids,
                    "-o",
                ])
                .arg(out),
        )?;
        let stat = spawn(
            Command::new("perf")
                .args(["stat", "-e", STAT_EVENTS, "-p", &pids, "-o"])
                .arg(out.with_extension("stat")),
        )?;
        // perf attaches after it starts; a short wait keeps the first second in the profile.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Recording(vec![record, stat]))
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // SIGINT makes perf write what it has and exit cleanly.
        for child in &mut self.0 {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

fn measure(
    path: PathKind,
    round: usize,
    pair: &NetnsPair,
    args: &Args,
    flavors: &[(PathKind, Flavor)],
    settings: &Settings,
) -> anyhow::Result<Run> {
    let proxies = match flavors.iter().find(|(p, _)| *p == path) {
        Some((_, flavor)) => Some(ZtunnelPair::start(flavor, pair, settings)?),
        None => None,
    };
    wait_path(pair)?;
    let rss_before = proxies.as_ref().map(rss).transpose()?;
    let c0 = cpu(&proxies)?;
    let record = |phase: PerfPhase| -> anyhow::Result<Option<Recording>> {
        match (&args.perf_dir, &proxies) {
            (Some(dir), Some(p)) if args.perf_phase == phase => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let out = dir.join(format!("{}-round{}.data", path.name(), round + 1));
                Ok(Some(Recording::start(p, &out, &args.perf_call_graph)?))
            }
            _ => Ok(None),
        }
    };
    let recording = record(PerfPhase::Bulk)?;
    let one_stream = iperf(pair, args, 1)?;
    drop(recording);
    let four_streams = iperf(pair, args, 4)?;
    let c1 = cpu(&proxies)?;
    let recording = record(PerfPhase::PingPong)?;
    let ping = sockperf(pair, args)?;
    drop(recording);
    let c2 = cpu(&proxies)?;
    let recording = record(PerfPhase::NewConnections)?;
    let close = wrk(pair, args, true)?;
    drop(recording);
    let c3 = cpu(&proxies)?;
    let keepalive = wrk(pair, args, false)?;
    let proxy = match proxies {
        Some(p) => {
            // Idle again: connections closed, buffers back to the allocator.
            std::thread::sleep(Duration::from_secs(1));
            let rss_after = rss(&p)?;
            let (connections, bytes) = p.server_counters(pair)?;
            if connections < 1.0 {
                bail!(
                    "{}: the server side's proxy counted no connections: the traffic did not go through it",
                    path.name()
                );
            }
            p.stop(pair)?;
            Some(ProxyCost {
                cpu_iperf: c1 - c0,
                cpu_close: c3 - c2,
                rss_before: rss_before.unwrap_or_default(),
                rss_after,
                connections,
                bytes,
            })
        }
        None => None,
    };
    Ok(Run {
        one_stream,
        four_streams,
        ping,
        close,
        keepalive,
        proxy,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// One table row: a figure per path per round.
struct Figure {
    name: &'static str,
    get: fn(&Run) -> Option<f64>,
    /// Mesh paths only (proxy costs): no direct column or mesh/direct ratio.
    mesh_only: bool,
    /// Whether the floor bounds it: per byte and per round trip on an open connection it does,
    /// but it opens a TCP connection between the relays for each new connection where HBONE
    /// reuses its pooled one, and its idle memory is a runtime with nothing else in it.
    floor_bounds: bool,
}

fn figures() -> Vec<Figure> {
    vec![
        Figure {
            name: "throughput, 1 stream (Gb/s)",
            get: |r| Some(r.one_stream.gbps()),
            mesh_only: false,
            floor_bounds: true,
        },
        Figure {
            name: "throughput, 4 streams (Gb/s)",
            get: |r| Some(r.four_streams.gbps()),
            mesh_only: false,
            floor_bounds: true,
        },
        Figure {
            name: "ping-pong 64 B avg RTT (µs)",
            get: |r| Some(r.ping.avg_us),
            mesh_only: false,
            floor_bounds: true,
        },
        Figure {
            name: "ping-pong 64 B p50 RTT (µs)",
            get: |r| Some(r.ping.p50_us),
            mesh_only: false,
            floor_bounds: true,
        },
        Figure {
            name: "ping-pong 64 B p99 RTT (µs)",
            get: |r| Some(r.ping.p99_us),
            mesh_only: false,
            floor_bounds: true,
        },
        Figure {
            name: "new connections/s (Connection: close)",
            get: |r| Some(r.close.per_second),
            mesh_only: false,
            floor_bounds: false,
        },
        Figure {
            name: "keep-alive requests/s",
            get: |r| Some(r.keepalive.per_second),
            mesh_only: false,
            floor_bounds: true,
        },
        Figure {
            name: "CPU-s per GB (iperf3, both sides)",
            get: |r| {
                r.proxy.as_ref().map(|p| {
                    p.cpu_iperf / ((r.one_stream.bytes + r.four_streams.bytes) as f64 / 1e9)
                })
            },
            mesh_only: true,
            floor_bounds: true,
        },
        Figure {
            name: "CPU-µs per connection (both sides)",
            get: |r| {
                r.proxy
                    .as_ref()
                    .map(|p| p.cpu_close * 1e6 / r.close.requests.max(1) as f64)
            },
            mesh_only: true,
            floor_bounds: false,
        },
        Figure {
            name: "RSS idle before runs, client (MB)",
            get: |r| r.proxy.as_ref().map(|p| p.rss_before[0] as f64 / 1024.0),
            mesh_only: true,
            floor_bounds: false,
        },
        Figure {
            name: "RSS idle before runs, server (MB)",
            get: |r| r.proxy.as_ref().map(|p| p.rss_before[1] as f64 / 1024.0),
            mesh_only: true,
            floor_bounds: false,
        },
        Figure {
            name: "RSS idle after runs, client (MB)",
            get: |r| r.proxy.as_ref().map(|p| p.rss_after[0] as f64 / 1024.0),
            mesh_only: true,
            floor_bounds: false,
        },
        Figure {
            name: "RSS idle after runs, server (MB)",
            get: |r| r.proxy.as_ref().map(|p| p.rss_after[1] as f64 / 1024.0),
            mesh_only: true,
            floor_bounds: false,
        },
    ]
}

/// Latency the mesh adds: mesh minus direct of the same round.
fn added(rounds: &[Vec<(PathKind, Run)>], path: PathKind, get: fn(&PingPong) -> f64) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|r| {
            let direct = r.iter().find(|(p, _)| *p == PathKind::Direct)?;
            let mesh = r.iter().find(|(p, _)| *p == path)?;
            Some(get(&mesh.1.ping) - get(&direct.1.ping))
        })
        .collect()
}

fn cell(values: &[f64]) -> String {
    let (m, lo, hi) = median_spread(values);
    if m.is_nan() {
        return "-".into();
    }
    let p = |x: f64| {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else if x.abs() >= 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.2}")
        }
    };
    if values.len() > 1 {
        format!("{} ({}..{})", p(m), p(lo), p(hi))
    } else {
        p(m)
    }
}

fn ratio(a: &[f64], b: &[f64]) -> String {
    let (a, b) = (median_spread(a).0, median_spread(b).0);
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}", a / b)
    }
}

/// Prints one row per figure: a cell per path that ran (median and spread over rounds), then
/// the ratios. `floor/peer` is the most any proxy pair could reach against the peer, on the
/// figures the floor bounds.
fn print_report(rounds: &[Vec<(PathKind, Run)>]) {
    let ran = |path: PathKind| rounds.iter().flatten().any(|(p, _)| *p == path);
    let (has_peer, has_floor) = (ran(PathKind::Peer), ran(PathKind::Floor));
    let values = |path: PathKind, get: fn(&Run) -> Option<f64>| -> Vec<f64> {
        rounds
            .iter()
            .flat_map(|r| {
                r.iter()
                    .filter(|(p, _)| *p == path)
                    .filter_map(|(_, run)| get(run))
            })
            .collect()
    };
    let skipped = |ran: bool, values: &[f64]| {
        if ran {
            cell(values)
        } else {
            "skipped".into()
        }
    };
    let w = 40;
    let row = |cells: [&str; 9]| {
        println!(
            "{:<w$} {:>20} {:>20} {:>20} {:>20} {:>10} {:>10} {:>12} {:>11}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8]
        );
    };
    row([
        "figure (median (min..max))",
        "direct",
        "floor",
        "Ambit",
        "peer",
        "Ambit/peer",
        "floor/peer",
        "Ambit/direct",
        "peer/direct",
    ]);
    for f in figures() {
        let (d, fl, a, p) = (
            values(PathKind::Direct, f.get),
            values(PathKind::Floor, f.get),
            values(PathKind::Ambit, f.get),
            values(PathKind::Peer, f.get),
        );
        let (d_cell, ad, pd) = if f.mesh_only {
            ("-".to_owned(), "-".to_owned(), "-".to_owned())
        } else {
            (cell(&d), ratio(&a, &d), ratio(&p, &d))
        };
        row([
            f.name,
            &d_cell,
            &skipped(has_floor, &fl),
            &cell(&a),
            &skipped(has_peer, &p),
            &ratio(&a, &p),
            &if f.floor_bounds {
                ratio(&fl, &p)
            } else {
                "-".to_owned()
            },
            &ad,
            &pd,
        ]);
    }
    type Get = fn(&PingPong) -> f64;
    let added_rows: [(&str, Get); 3] = [
        ("added avg RTT, mesh - direct (µs)", |p| p.avg_us),
        ("added p50 RTT, mesh - direct (µs)", |p| p.p50_us),
        ("added p99 RTT, mesh - direct (µs)", |p| p.p99_us),
    ];
    for (name, get) in added_rows {
        let (fl, a, p) = (
            added(rounds, PathKind::Floor, get),
            added(rounds, PathKind::Ambit, get),
            added(rounds, PathKind::Peer, get),
        );
        row([
            name,
            "-",
            &skipped(has_floor, &fl),
            &cell(&a),
            &skipped(has_peer, &p),
            &ratio(&a, &p),
            &ratio(&fl, &p),
            "-",
            "-",
        ]);
    }
}

fn run_json(path: PathKind, r: &Run) -> serde_json::Value {
    json!({
        "path": path.name(),
        "throughput_1_stream": {"bytes": r.one_stream.bytes, "seconds": r.one_stream.seconds, "gbps": r.one_stream.gbps()},
        "throughput_4_streams": {"bytes": r.four_streams.bytes, "seconds": r.four_streams.seconds, "gbps": r.four_streams.gbps()},
        "ping_pong": {"avg_us": r.ping.avg_us, "p50_us": r.ping.p50_us, "p99_us": r.ping.p99_us, "round_trips": r.ping.round_trips},
        "connection_close": {"requests": r.close.requests, "per_second": r.close.per_second, "socket_errors": r.close.socket_errors},
        "keepalive": {"requests": r.keepalive.requests, "per_second": r.keepalive.per_second, "socket_errors": r.keepalive.socket_errors},
        "proxy": r.proxy.as_ref().map(|p| json!({
            "cpu_seconds_iperf": p.cpu_iperf,
            "cpu_seconds_connection_close": p.cpu_close,
            "rss_kib_before": p.rss_before,
            "rss_kib_after": p.rss_after,
            "server_side_connections": p.connections,
            "server_side_bytes": p.bytes,
        })),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let ours = ambit_bench::binary(
        "--ztunnel",
        args.ztunnel.as_deref(),
        "ztunnel",
        "cargo build --release -p ambit-ztunnel --bin ztunnel",
    )?;
    let mut flavors = vec![(PathKind::Ambit, Flavor::Ambit(ours))];
    if let Some(peer) = &args.peer_ztunnel {
        if !peer.is_file() {
            bail!("--peer-ztunnel {}: no such file", peer.display());
        }
        flavors.push((PathKind::Peer, Flavor::Peer(peer.clone())));
    }
    if !args.no_floor {
        let relay = ambit_bench::binary(
            "--floor-relay",
            args.floor_relay.as_deref(),
            "floor_relay",
            "cargo build --release -p ambit-bench --bin floor_relay",
        )
        .context("the floor path's relay (--no-floor skips that path)")?;
        flavors.push((PathKind::Floor, Flavor::Floor(relay, args.floor_tunnel)));
    }
    for tool in ["iperf3", "sockperf", "wrk", "nginx", "iptables"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed (scripts/bench.sh installs iperf3 sockperf wrk nginx)");
        }
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root: network namespaces and iptables");
    }
    let has_peer = flavors.iter().any(|(p, _)| *p == PathKind::Peer);
    let has_floor = flavors.iter().any(|(p, _)| *p == PathKind::Floor);

    let pair = NetnsPair::build("zp")?;
    let dir = std::env::temp_dir().join(format!(
        "ambit-ztunnel-peer-{}",
        pair.client.trim_end_matches("-c")
    ));
    std::fs::create_dir_all(&dir)?;
    let settings = Settings {
        peer_rules: args.peer_rules,
        worker_threads: args.worker_threads,
        log_level: args.log_level.clone(),
        dir: dir.join("proxies"),
    };
    let _servers = start_servers(&pair, &dir)?;

    let load_before = loadavg();
    println!(
        "ztunnel side by side: {} and {} ({}), veth pair {} <-> {}",
        pair.client,
        pair.server,
        dir.display(),
        ambit_bench::pair::CLIENT_IP,
        SERVER_IP
    );
    println!(
        "each: {} rounds of iperf3 1 and 4 streams ({}), sockperf ping-pong 64 B ({} s), wrk -t 2 -c {} with and without `Connection: close` ({} s), nginx 1 worker, 1 KB body",
        args.rounds,
        if args.quick { "32 MiB each".to_owned() } else { format!("{} s each", args.seconds) },
        if args.quick { 1 } else { args.seconds },
        args.connections,
        if args.quick { 1 } else { args.seconds },
    );
    println!("ztunnels: dedicated mode on both sides, HBONE (HTTP/2 CONNECT) over TLS 1.3 mTLS with ECDSA P-256 SPIFFE certificates, {} worker threads, log level {}", args.worker_threads, args.log_level);
    for (path, flavor) in &flavors {
        println!("  {}: {}", path.name(), flavor.describe(&settings));
    }
    if !has_peer {
        println!("  peer: skipped (no --peer-ztunnel given)");
    }
    if !has_floor {
        println!("  floor: skipped (--no-floor)");
    }
    println!(
        "machine: {} CPUs, load average before: {load_before}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut paths = vec![PathKind::Direct];
    if has_floor {
        paths.push(PathKind::Floor);
    }
    paths.push(PathKind::Ambit);
    if has_peer {
        paths.push(PathKind::Peer);
    }
    let mut rounds: Vec<Vec<(PathKind, Run)>> = Vec::new();
    let mut round_json = Vec::new();
    for round in 0..args.rounds {
        let order: Vec<PathKind> = if round % 2 == 0 {
            paths.clone()
        } else {
            paths.iter().rev().copied().collect()
        };
        let names: Vec<&str> = order.iter().map(|p| p.name()).collect();
        eprintln!(
            "round {}/{}: {} (load {})",
            round + 1,
            args.rounds,
            names.join(", "),
            loadavg()
        );
        let mut runs = Vec::new();
        for path in order {
            let run = measure(path, round, &pair, &args, &flavors, &settings)
                .with_context(|| format!("round {}, {}", round + 1, path.name()))?;
            eprintln!(
                "  {:<6} {:>6.2} Gb/s  {:>6.2} Gb/s x4  rtt {:>6.1} µs  {:>8.0} conn/s  {:>8.0} req/s",
                path.name(),
                run.one_stream.gbps(),
                run.four_streams.gbps(),
                run.ping.avg_us,
                run.close.per_second,
                run.keepalive.per_second
            );
            runs.push((path, run));
        }
        round_json.push(json!({
            "round": round + 1,
            "order": names,
            "load_after": loadavg(),
            "runs": runs.iter().map(|(p, r)| run_json(*p, r)).collect::<Vec<_>>(),
        }));
        rounds.push(runs);
    }
    let load_after = loadavg();
    println!();
    print_report(&rounds);
    println!(
        "load average: before {load_before}, after {load_after} (1, 5, 15 min; {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "peer": args.peer_ztunnel.as_ref().map(|p| p.display().to_string()),
            "peer_skipped": !has_peer,
            "floor_skipped": !has_floor,
            "worker_threads": args.worker_threads,
            "load_before": load_before,
            "load_after": load_after,
            "rounds": round_json,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(_servers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
