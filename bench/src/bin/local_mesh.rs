//! Local mesh benchmark: the real mesh (`ambitctl up`: controller, one ztunnel per node, pods
//! as network namespaces) measured beside the direct path and beside a classic mTLS tunnel,
//! all in one run.
//!
//! Three paths, each for a SAME-NODE and a CROSS-NODE pod pair:
//! - direct: un-enrolled pods (namespace `plain`), plain TCP over the veths and the fabric;
//! - mesh: enrolled pods (namespace `meshed`): client pod → in-pod capture → ztunnel →
//!   HBONE (mTLS, HTTP/2 CONNECT, pooled) → ztunnel → server pod;
//! - reference: un-enrolled pods through haproxy in each node's namespace: client pod →
//!   local haproxy (plain) → TLS 1.3 with client certificates → haproxy of the server's node
//!   → server pod. One TLS connection per user connection (session resumption on), as
//!   classic tunnels do.
//!
//! Workloads, run from a client pod against small servers in the server pods (all threads of
//! this process, each `setns`-ed into its pod):
//! - bulk: one connection sends `--bulk-mib` MiB one way (MB/s);
//! - request/response: 64-byte ping-pongs on one connection (p50/p99 µs);
//! - new connections: `--workers` loops of connect + 64-byte request/response + close
//!   (connections per second);
//! - proxy CPU: utime+stime of the proxies (both ztunnels, or both haproxys) during the bulk
//!   and the connection phases, as cores busy; RSS: the proxies' VmRSS, and its growth per
//!   connection with `--idle` idle connections open.
//!
//! How to read the table: `mesh/direct` is what the mesh costs against no proxy at all;
//! `ref/direct` the same for haproxy; `mesh/ref` below 1.0 on latency (above 1.0 on MB/s and
//! connections/s) means the mesh does better than the classic tunnel. Every process (client,
//! servers, proxies, the kernel's veths) shares the machine's cores, so the absolute figures
//! are for this machine under this load (printed with the table); compare the ratios.
//!
//! A measurement, not a test: nothing asserts on timing. Run as root with
//! `scripts/bench.sh` (installs haproxy, builds, runs; `--quick` for a smaller run). The
//! cluster is always removed at the end (`ambitctl down`), also on error, panic or Ctrl-C.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_bench::servers::{run_echo, run_sink, send_to_sink};
use ambit_bench::{mb_per_s, micros, proc_cpu_seconds, proc_status_kib, Samples};
use ambitctl::local::net;
use ambitctl::local::state::ClusterState;
use anyhow::{bail, Context as _};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// A smaller run (about a minute): less data, fewer samples.
    #[arg(long)]
    quick: bool,
    /// MiB sent one way in the bulk test (default 1024, quick 256).
    #[arg(long)]
    bulk_mib: Option<u64>,
    /// 64-byte round trips in the latency test (default 10,000, quick 2,000).
    #[arg(long)]
    pings: Option<usize>,
    /// New connections in the connection-rate test (default 4,000, quick 1,000).
    #[arg(long)]
    connects: Option<usize>,
    /// Concurrent connecting loops.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Idle connections opened to measure the proxies' memory per connection (default 1,000,
    /// quick 300).
    #[arg(long)]
    idle: Option<usize>,
    /// Where the cluster's state and logs live while the bench runs.
    #[arg(long, default_value = "/var/lib/ambit/bench/local-mesh")]
    state_dir: PathBuf,
    /// Prefix of the bench cluster's namespace names (apart from `ambitctl up`'s default).
    #[arg(long, default_value = "ambitbench")]
    netns_prefix: String,
}

const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;
/// haproxy: TLS listeners on each node (sink, echo), plain listeners for local pods at
/// 17<dest node><0 sink|1 echo>.
const TLS_PORT: u16 = 16000;
const OUT_PORT: u16 = 17000;

/// The pods: (namespace, name, node, ip). Two namespaces, the same shape in each.
const PODS: [(&str, &str, usize, [u8; 4]); 6] = [
    ("meshed", "client", 1, [10, 77, 1, 2]),
    ("meshed", "local", 1, [10, 77, 1, 3]),
    ("meshed", "remote", 2, [10, 77, 2, 2]),
    ("plain", "client", 1, [10, 77, 1, 4]),
    ("plain", "local", 1, [10, 77, 1, 5]),
    ("plain", "remote", 2, [10, 77, 2, 3]),
];

fn pod_ip(namespace: &str, name: &str) -> Ipv4Addr {
    PODS.iter()
        .find(|p| p.0 == namespace && p.1 == name)
        .map_or(Ipv4Addr::UNSPECIFIED, |p| Ipv4Addr::from(p.3))
}

/// The Kubernetes objects the controller reads: `meshed` enrolled, `plain` not.
fn objects_yaml() -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: meshed\n  labels:\n    \
         ambit.dev/dataplane-mode: ambient\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  \
         name: plain\n",
    );
    for (ns, name, node, ip) in PODS {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
             labels:\n    app: {name}\nspec:\n  nodeName: node{node}\n  serviceAccountName: default\n  \
             containers:\n  - name: app\n    image: bench\nstatus:\n  podIP: {}\n",
            Ipv4Addr::from(ip)
        ));
    }
    out
}

/// Everything the run started; dropping it stops haproxy and runs `ambitctl down`, so an
/// error or a panic half-way still leaves no namespaces or processes behind.
struct Cleanup {
    ambitctl: PathBuf,
    state_dir: PathBuf,
    prefix: String,
    children: Vec<Child>,
}

impl Cleanup {
    fn down(ambitctl: &Path, state_dir: &Path, prefix: &str) {
        let status = Command::new(ambitctl)
            .arg("down")
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--netns-prefix", prefix])
            .stdout(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "local_mesh: `ambitctl down --state-dir {} --netns-prefix {prefix}` failed ({status:?}); run it by hand",
                state_dir.display()
            );
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!("local_mesh: removing the bench cluster (ambitctl down)");
        Cleanup::down(&self.ambitctl, &self.state_dir, &self.prefix);
    }
}

/// Ctrl-C or SIGTERM skip destructors, so a watcher thread tears down (haproxy runs inside
/// a node namespace, which `ambitctl down` empties) and exits.
fn down_on_signal(ambitctl: PathBuf, state_dir: PathBuf, prefix: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                eprintln!("local_mesh: interrupted, removing the bench cluster");
                Cleanup::down(&ambitctl, &state_dir, &prefix);
                std::process::exit(130);
            })
        })?;
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A throw-away CA and one certificate per node (ECDSA P-256, like the mesh's), for haproxy.
fn haproxy_pki(dir: &Path) -> anyhow::Result<()> {
    let d = |f: &str| dir.join(f).display().to_string();
    run_cmd(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &d("ca.key"),
        "-out",
        &d("ca.pem"),
        "-subj",
        "/CN=ambit-bench-ca",
        "-days",
        "2",
    ]))?;
    for node in ["node1", "node2"] {
        let ext = format!(
            "subjectAltName=DNS:{node}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
        );
        std::fs::write(d(&format!("{node}.ext")), ext)?;
        run_cmd(Command::new("openssl").args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &d(&format!("{node}.key")),
            "-out",
            &d(&format!("{node}.csr")),
            "-subj",
            &format!("/CN={node}"),
        ]))?;
        run_cmd(Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &d(&format!("{node}.csr")),
            "-CA",
            &d("ca.pem"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &d(&format!("{node}.ext")),
            "-out",
            &d(&format!("{node}.crt")),
        ]))?;
        // haproxy wants the certificate and its key in one file.
        let pem = std::fs::read_to_string(d(&format!("{node}.crt")))?
            + &std::fs::read_to_string(d(&format!("{node}.key")))?;
        std::fs::write(d(&format!("{node}.pem")), pem)?;
    }
    Ok(())
}

/// haproxy for node `k` of two: TLS in (client certificate required) to this node's plain
/// server pod; plain out from local pods to either node's TLS listeners.
fn haproxy_config(dir: &Path, k: usize) -> String {
    let ca = dir.join("ca.pem").display().to_string();
    let crt = dir.join(format!("node{k}.pem")).display().to_string();
    let server = if k == 1 {
        pod_ip("plain", "local")
    } else {
        pod_ip("plain", "remote")
    };
    // maxconn 8000 keeps haproxy's descriptors (2 per connection) under a 20,000 limit.
    // Two threads: ztunnel's runtime has one worker per core, and this machine's cores.
    let mut cfg = format!(
        "global\n    maxconn 8000\n    nbthread {threads}\n    \
         ssl-default-bind-options ssl-min-ver TLSv1.3\n    \
         ssl-default-server-options ssl-min-ver TLSv1.3\n\
         defaults\n    mode tcp\n    maxconn 8000\n    timeout connect 5s\n    \
         timeout client 10m\n    timeout server 10m\n",
        threads = std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    for (i, (svc, port)) in [("sink", SINK_PORT), ("echo", ECHO_PORT)]
        .into_iter()
        .enumerate()
    {
        let i = i as u16;
        cfg.push_str(&format!(
            "frontend in_{svc}\n    bind :{tls} ssl crt {crt} ca-file {ca} verify required\n    \
             default_backend pod_{svc}\nbackend pod_{svc}\n    server pod {server}:{port}\n",
            tls = TLS_PORT + i,
        ));
        for dest in 1..=2u16 {
            cfg.push_str(&format!(
                "frontend out_{dest}_{svc}\n    bind :{out}\n    default_backend tls_{dest}_{svc}\n\
                 backend tls_{dest}_{svc}\n    server node{dest} {ip}:{tls} ssl crt {crt} ca-file {ca} \
                 verify required verifyhost node{dest}\n",
                out = OUT_PORT + dest * 10 + i,
                ip = net::node_ip(usize::from(dest)).map_or(Ipv4Addr::UNSPECIFIED, |a| a),
                tls = TLS_PORT + i,
            ));
        }
    }
    cfg
}

/// Starts the sink and echo servers in pod namespace `netns`, on a thread of their own that
/// lives as long as the process; returns once both listen.
fn start_servers(netns: &str) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let ns = netns.to_owned();
    std::thread::Builder::new()
        .name(format!("servers-{netns}"))
        .spawn(move || {
            let ready = tx.clone();
            let ran = net::in_netns(&ns.clone(), move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let sink = TcpListener::bind(("0.0.0.0", SINK_PORT)).await?;
                    let echo = TcpListener::bind(("0.0.0.0", ECHO_PORT)).await?;
                    let _ = ready.send(Ok(()));
                    tokio::join!(run_sink(sink), run_echo(echo));
                    Ok(())
                })
            });
            let err = match ran {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("{e}"),
            };
            let _ = tx.send(Err(err));
        })?;
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("servers in {netns}: {e}"),
        Err(_) => bail!("servers in {netns} did not start"),
    }
}

/// Runs `work` on a fresh single-threaded runtime inside pod namespace `netns`: every socket
/// it opens belongs to that pod.
fn in_pod<T, Fut>(netns: &str, work: impl FnOnce() -> Fut + Send + 'static) -> anyhow::Result<T>
where
    T: Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    net::in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(work())
    })?
}

async fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn bulk(sink: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let mut conn = connect(sink).await?;
    send_to_sink(&mut conn, bytes, 256 * 1024).await
}

async fn ping_pong(echo: SocketAddr, n: usize, warm_up: usize) -> anyhow::Result<Samples> {
    let mut conn = connect(echo).await?;
    let ping = [0x42u8; 64];
    let mut pong = [0u8; 64];
    let mut samples = Samples::with_capacity(n);
    for i in 0..n + warm_up {
        let start = Instant::now();
        conn.write_all(&ping).await?;
        conn.read_exact(&mut pong).await?;
        if i >= warm_up {
            samples.record(start.elapsed());
        }
    }
    anyhow::ensure!(pong == ping, "echo returned different bytes");
    Ok(samples)
}

/// `total` connections (connect, 64-byte request/response, close) over `workers` loops;
/// returns the wall time.
async fn conn_rate(echo: SocketAddr, total: usize, workers: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let n = total / workers + usize::from(w < total % workers);
        tasks.spawn(async move {
            let ping = [0x17u8; 64];
            let mut pong = [0u8; 64];
            for _ in 0..n {
                let mut conn = connect(echo).await?;
                conn.write_all(&ping).await?;
                conn.read_exact(&mut pong).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(start.elapsed())
}

/// Opens `n` connections and makes each carry one round trip (so every proxy on the way
/// holds its state), then reads the proxies' RSS with them open: (before, open) in KiB.
async fn idle_rss(echo: SocketAddr, n: usize, pids: Vec<u32>) -> anyhow::Result<(u64, u64)> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(&pids)?;
    let mut open = Vec::with_capacity(n);
    let mut pong = [0u8; 8];
    for _ in 0..n {
        let mut conn = connect(echo).await?;
        conn.write_all(b"idle-bye").await?;
        conn.read_exact(&mut pong).await?;
        open.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(&pids)?;
    drop(open);
    Ok((before, after))
}

fn rss_kib(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| proc_status_kib(*p, "VmRSS")).sum()
}

fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| proc_cpu_seconds(*p)).sum()
}

/// One way from a client pod to a server pod.
#[derive(Debug, Clone)]
struct Route {
    client_netns: String,
    sink: SocketAddr,
    echo: SocketAddr,
    /// The proxies on the way (none for direct).
    proxies: Vec<u32>,
}

/// What one route measured. `None` where the figure has no meaning (no proxy).
#[derive(Debug, Default, Clone)]
struct Measured {
    mb_s: f64,
    bulk_cores: Option<f64>,
    p50_us: f64,
    p99_us: f64,
    conns_per_s: f64,
    conn_cpu_us: Option<f64>,
    rss_mib: Option<f64>,
    rss_per_conn_kib: Option<f64>,
}

struct Sizes {
    bytes: u64,
    pings: usize,
    connects: usize,
    workers: usize,
    idle: usize,
}

/// Retries one small round trip until the route carries traffic (the mesh needs its
/// workloads and certificates from the controller first).
fn wait_route(route: &Route, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let echo = route.echo;
        let tried = in_pod(&route.client_netns, move || async move {
            tokio::time::timeout(Duration::from_secs(3), ping_pong(echo, 10, 0))
                .await
                .context("timed out")?
        });
        match tried {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("{what} never carried traffic"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Runs `phase` in the client pod; returns its result and the proxies' CPU seconds used.
fn with_cpu<T: Send + 'static, Fut: Future<Output = anyhow::Result<T>>>(
    route: &Route,
    phase: impl FnOnce() -> Fut + Send + 'static,
) -> anyhow::Result<(T, f64, Duration)> {
    let cpu0 = cpu_seconds(&route.proxies)?;
    let start = Instant::now();
    let out = in_pod(&route.client_netns, phase)?;
    let wall = start.elapsed();
    Ok((out, cpu_seconds(&route.proxies)? - cpu0, wall))
}

fn measure(route: &Route, what: &str, sizes: &Sizes) -> anyhow::Result<Measured> {
    eprintln!("local_mesh: measuring {what}");
    wait_route(route, what)?;
    let has_proxy = !route.proxies.is_empty();
    let (sink, echo) = (route.sink, route.echo);
    let bytes = sizes.bytes;
    let (elapsed, cpu, wall) =
        with_cpu(route, move || bulk(sink, bytes)).with_context(|| format!("bulk, {what}"))?;
    let pings = sizes.pings;
    let mut samples = in_pod(&route.client_netns, move || ping_pong(echo, pings, 500))
        .with_context(|| format!("ping-pong, {what}"))?;
    let (connects, workers) = (sizes.connects, sizes.workers);
    let (conn_wall, conn_cpu, _) = with_cpu(route, move || conn_rate(echo, connects, workers))
        .with_context(|| format!("connections, {what}"))?;
    let mut m = Measured {
        mb_s: mb_per_s(bytes, elapsed),
        bulk_cores: has_proxy.then(|| cpu / wall.as_secs_f64()),
        p50_us: micros(samples.percentile(50.0)),
        p99_us: micros(samples.percentile(99.0)),
        conns_per_s: connects as f64 / conn_wall.as_secs_f64(),
        conn_cpu_us: has_proxy.then(|| conn_cpu / connects as f64 * 1e6),
        ..Measured::default()
    };
    if has_proxy {
        let (idle, pids) = (sizes.idle, route.proxies.clone());
        let (before, after) = in_pod(&route.client_netns, move || idle_rss(echo, idle, pids))
            .with_context(|| format!("idle connections, {what}"))?;
        m.rss_mib = Some(before as f64 / 1024.0);
        m.rss_per_conn_kib = Some(after.saturating_sub(before) as f64 / idle as f64);
    }
    Ok(m)
}

/// One row of the three-way table; `None` cells print as `-`.
struct Row3 {
    metric: String,
    direct: Option<f64>,
    mesh: Option<f64>,
    reference: Option<f64>,
}

fn cell(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.1}"),
        _ => "-".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && (a / b).is_finite() => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn print_table3(title: &str, rows: &[Row3]) {
    println!("{title}");
    let width = rows.iter().map(|r| r.metric.len()).max().unwrap_or(6);
    println!(
        "{:<width$}  {:>10}  {:>10}  {:>10}  {:>11}  {:>10}  {:>9}",
        "metric", "direct", "mesh", "reference", "mesh/direct", "ref/direct", "mesh/ref"
    );
    for r in rows {
        println!(
            "{:<width$}  {:>10}  {:>10}  {:>10}  {:>11}  {:>10}  {:>9}",
            r.metric,
            cell(r.direct),
            cell(r.mesh),
            cell(r.reference),
            ratio(r.mesh, r.direct),
            ratio(r.reference, r.direct),
            ratio(r.mesh, r.reference),
        );
    }
}

fn rows(sizes: &Sizes, d: &Measured, m: &Measured, r: &Measured) -> Vec<Row3> {
    let row = |metric: String, f: &dyn Fn(&Measured) -> Option<f64>| Row3 {
        metric,
        direct: f(d),
        mesh: f(m),
        reference: f(r),
    };
    vec![
        row(
            format!("bulk {} MiB one way, MB/s", sizes.bytes >> 20),
            &|x| Some(x.mb_s),
        ),
        row("  proxy CPU during bulk, cores".into(), &|x| x.bulk_cores),
        row("request/response 64 B p50, µs".into(), &|x| Some(x.p50_us)),
        row("request/response 64 B p99, µs".into(), &|x| Some(x.p99_us)),
        row(
            format!("new connections/s ({} loops)", sizes.workers),
            &|x| Some(x.conns_per_s),
        ),
        row("  proxy CPU per connection, µs".into(), &|x| x.conn_cpu_us),
        row("proxy RSS before idle conns, MiB".into(), &|x| x.rss_mib),
        row(
            format!("proxy RSS per idle conn ({}), KiB", sizes.idle),
            &|x| x.rss_per_conn_kib,
        ),
    ]
}

/// The 1, 5 and 15 minute load averages: the machine is shared, so each run says how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let q = args.quick;
    let sizes = Sizes {
        bytes: args.bulk_mib.unwrap_or(if q { 256 } else { 1024 }) << 20,
        pings: args.pings.unwrap_or(if q { 2_000 } else { 10_000 }),
        connects: args.connects.unwrap_or(if q { 1_000 } else { 4_000 }),
        workers: args.workers.max(1),
        idle: args.idle.unwrap_or(if q { 300 } else { 1_000 }).max(1),
    };
    let load_before = load_average();
    let me = std::env::current_exe().context("locating this executable")?;
    let bin_dir = me.parent().context("executable without a directory")?;
    let ambitctl = bin_dir.join("ambitctl");
    anyhow::ensure!(
        ambitctl.is_file(),
        "{} is missing: cargo build --release -p ambitctl -p ambit-controller -p ambit-ztunnel -p ambit-waypoint -p ambit-cni",
        ambitctl.display()
    );
    let objects = args.state_dir.with_extension("objects");
    let pki = args.state_dir.with_extension("haproxy");
    for dir in [&objects, &pki] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(objects.join("bench.yaml"), objects_yaml())?;

    down_on_signal(
        ambitctl.clone(),
        args.state_dir.clone(),
        args.netns_prefix.clone(),
    )?;
    let mut cleanup = Cleanup {
        ambitctl: ambitctl.clone(),
        state_dir: args.state_dir.clone(),
        prefix: args.netns_prefix.clone(),
        children: Vec::new(),
    };
    eprintln!("local_mesh: ambitctl up --detach (2 nodes, 6 pods)");
    let up = Command::new(&ambitctl)
        .arg("up")
        .arg("--detach")
        .arg("--objects")
        .arg(&objects)
        .arg("--state-dir")
        .arg(&args.state_dir)
        .args(["--netns-prefix", &args.netns_prefix])
        .stdout(Stdio::null())
        .status()
        .context("running ambitctl up")?;
    anyhow::ensure!(up.success(), "ambitctl up failed ({up})");
    let state = ClusterState::load(&args.state_dir)?;
    let netns_of = |ns: &str, name: &str| -> anyhow::Result<String> {
        state
            .pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
            .map(|p| p.netns.clone())
            .with_context(|| format!("pod {ns}/{name} is not in cluster.json"))
    };
    let node_netns = |k: usize| -> anyhow::Result<String> {
        state
            .node(&format!("node{k}"))
            .map(|n| n.netns.clone())
            .with_context(|| format!("node{k} is not in cluster.json"))
    };
    let ztunnels: Vec<u32> = state
        .nodes
        .iter()
        .filter_map(|n| n.ztunnel.as_ref())
        .filter_map(|z| u32::try_from(z.pid).ok())
        .collect();
    anyhow::ensure!(ztunnels.len() == 2, "expected two ztunnels in cluster.json");

    for (ns, name) in [
        ("meshed", "local"),
        ("meshed", "remote"),
        ("plain", "local"),
        ("plain", "remote"),
    ] {
        start_servers(&netns_of(ns, name)?)?;
    }

    haproxy_pki(&pki).context("making haproxy's certificates with openssl")?;
    let mut haproxys = Vec::new();
    for k in 1..=2 {
        let cfg = pki.join(format!("haproxy-node{k}.cfg"));
        std::fs::write(&cfg, haproxy_config(&pki, k))?;
        let log = std::fs::File::create(pki.join(format!("haproxy-node{k}.log")))?;
        // `ip netns exec` execs haproxy, so the child's pid is haproxy's (for /proc).
        let child = Command::new("ip")
            .args(["netns", "exec", &node_netns(k)?, "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy (apt-get install haproxy)")?;
        haproxys.push(child.id());
        cleanup.children.push(child);
    }
    // A bad configuration or a low descriptor limit makes haproxy exit at once.
    std::thread::sleep(Duration::from_millis(500));
    for (k, child) in cleanup.children.iter_mut().enumerate() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "haproxy on node{} exited ({status}); see {}",
                k + 1,
                pki.join(format!("haproxy-node{}.log", k + 1)).display()
            );
        }
    }

    let sock = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    let gateway = net::pod_gateway(1)?;
    let plain_client = netns_of("plain", "client")?;
    let meshed_client = netns_of("meshed", "client")?;
    let mut tables = Vec::new();
    for (placement, server, dest) in [("same node", "local", 1u16), ("cross node", "remote", 2)] {
        let direct = Route {
            client_netns: plain_client.clone(),
            sink: sock(pod_ip("plain", server), SINK_PORT),
            echo: sock(pod_ip("plain", server), ECHO_PORT),
            proxies: Vec::new(),
        };
        let mesh = Route {
            client_netns: meshed_client.clone(),
            sink: sock(pod_ip("meshed", server), SINK_PORT),
            echo: sock(pod_ip("meshed", server), ECHO_PORT),
            proxies: ztunnels.clone(),
        };
        let reference = Route {
            client_netns: plain_client.clone(),
            sink: sock(gateway, OUT_PORT + dest * 10),
            echo: sock(gateway, OUT_PORT + dest * 10 + 1),
            proxies: haproxys.clone(),
        };
        let d = measure(&direct, &format!("{placement}, direct"), &sizes)?;
        let m = measure(&mesh, &format!("{placement}, mesh"), &sizes)?;
        let r = measure(&reference, &format!("{placement}, reference"), &sizes)?;
        tables.push((placement, rows(&sizes, &d, &m, &r)));
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    for (placement, rows) in &tables {
        print_table3(
            &format!(
                "Local mesh, {placement}: direct TCP vs mesh (ztunnel HBONE) vs reference (haproxy TLS 1.3 mTLS); {} pings, {} connections",
                sizes.pings, sizes.connects
            ),
            rows,
        );
        println!();
    }
    println!(
        "{cores} cores; load average (1/5/15 min) {load_before} before the run, {} after; proxy CPU sums both ztunnels (mesh) or both haproxys (reference)",
        load_average()
    );
    drop(cleanup);
    Ok(())
}
