//! Waypoint benchmark: HTTP/1.1 requests with 1 KB bodies each way, to the same backend over
//! four paths measured in one run:
//!
//! - direct: keep-alive TCP to the backend;
//! - hbone: one HBONE hop (client pool → mTLS CONNECT → destination-ztunnel stand-in → TCP);
//! - two hops: client → HBONE → a layer-4 relay in this process (terminates the tunnel, opens
//!   the next one to the same authority, copies) → HBONE → the same destination stand-in →
//!   TCP: a waypoint's two hops without anything done with HTTP, so `waypoint/two hops` is
//!   the cost of the waypoint's L7 work and `two hops/hbone` the most any waypoint could reach
//!   against one hop;
//! - waypoint: client → HBONE → the real `waypoint` binary (a child process, static state)
//!   → HBONE → the same destination stand-in → TCP.
//!
//! Prints latency p50/p99 of sequential requests on one connection, requests/s with
//! `--connections` concurrent connections, and the waypoint process's CPU (from
//! `/proc/<pid>/stat`) and RSS while it serves a paced 1,000 req/s. A measurement, not a test:
//! nothing asserts on timing.
//!
//! Run: `cargo build --release -p ambit-waypoint -p ambit-bench &&
//! target/release/waypoint-bench` (the waypoint binary is looked up next to this one, or
//! given with `--waypoint-bin`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ambit_bench::servers::{Forward, Relay};
use ambit_bench::{micros, print_table, Row, Samples};
use ambit_hbone::client::ConnectTarget;
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{Server, ServerSettings};
use ambit_hbone::testing::TestPki;
use ambit_hbone::{cert, csr, tls, Identity};
use ambit_testing::free_port;
use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// Sequential requests per path for latency (after 500 warm-up ones).
    #[arg(long, default_value_t = 5_000)]
    requests: usize,
    /// Concurrent connections in the throughput test.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests per connection in the throughput test.
    #[arg(long, default_value_t = 1_000)]
    per_connection: usize,
    /// Seconds of paced load for the CPU/RSS figure.
    #[arg(long, default_value_t = 10)]
    load_seconds: u64,
    /// Requests per second of the paced load.
    #[arg(long, default_value_t = 1_000)]
    load_rate: u64,
    /// The waypoint binary.
    #[arg(long)]
    waypoint_bin: Option<PathBuf>,
    /// The waypoint's `--worker-threads` (default: its own, one per CPU).
    #[arg(long)]
    worker_threads: Option<std::num::NonZeroUsize>,
}

/// 1 KB answers to everything (after reading the request body).
async fn run_backend(listener: TcpListener) {
    let body = Bytes::from(vec![b'x'; 1024]);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[derive(Clone)]
enum Path {
    Direct(SocketAddr),
    Tunnel {
        pool: Pool,
        target: Box<ConnectTarget>,
    },
}

impl Path {
    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        match self {
            Path::Direct(addr) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                Ok(sender)
            }
            Path::Tunnel { pool, target } => {
                let stream = pool.connect((**target).clone()).await?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                Ok(sender)
            }
        }
    }
}

async fn one(sender: &mut SendRequest<Full<Bytes>>, body: &Bytes) -> anyhow::Result<()> {
    sender.ready().await?;
    let req = http::Request::builder()
        .method("POST")
        .uri("/bench")
        .header("host", "web.bench.svc.cluster.local")
        .body(Full::new(body.clone()))?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let got = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(got.len() == 1024, "body of {} bytes", got.len());
    Ok(())
}

async fn latency(path: &Path, n: usize) -> anyhow::Result<Samples> {
    let body = Bytes::from(vec![b'y'; 1024]);
    let mut sender = path.connect().await?;
    let mut samples = Samples::with_capacity(n);
    for i in 0..n + 500 {
        let start = Instant::now();
        one(&mut sender, &body).await?;
        if i >= 500 {
            samples.record(start.elapsed());
        }
    }
    Ok(samples)
}

async fn throughput(path: &Path, connections: usize, per: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(vec![b'y'; 1024]);
            let mut sender = path.connect().await?;
            for _ in 0..per {
                one(&mut sender, &body).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((connections * per) as f64 / start.elapsed().as_secs_f64())
}

/// CPU seconds (user + system) and RSS (KiB) of a process.
fn proc_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // USER_HZ is 100 on every Linux we run on.
    Ok((ticks as f64 / 100.0, rss))
}

/// Paced load: `rate` req/s for `seconds` over 8 connections.
async fn paced(path: &Path, rate: u64, seconds: u64) -> anyhow::Result<u64> {
    let conns = 8u64;
    let per_conn_interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(vec![b'y'; 1024]);
            let mut sender = path.connect().await?;
            let mut tick = tokio::time::interval(per_conn_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut done = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                one(&mut sender, &body).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let waypoint_bin = ambit_bench::binary(
        "--waypoint-bin",
        args.waypoint_bin.as_deref(),
        "waypoint",
        "cargo build --release -p ambit-waypoint",
    )?;

    let backend_listener = TcpListener::bind("127.0.0.1:0").await?;
    let backend = backend_listener.local_addr()?;
    tokio::spawn(run_backend(backend_listener));

    let td = "cluster.local";
    let pki = TestPki::new(td);
    let bundle = pki.bundle();
    let pod_id = Identity::new(td, "bench", "web")?;
    let client_id = Identity::new(td, "bench", "client")?;
    let waypoint_id = Identity::new(td, "bench", "waypoint")?;
    let dest_listener = TcpListener::bind("127.0.0.1:0").await?;
    let hbone_port = dest_listener.local_addr()?.port();
    let dest = Server::new(
        dest_listener,
        tls::server_config(&pki.issue(&pod_id), &bundle)?,
        Forward,
        ServerSettings::default(),
    );
    tokio::spawn(dest.run(std::future::pending()));

    // The waypoint child: certificate files and a static state in a temporary directory.
    let dir = std::env::temp_dir().join(format!("waypoint-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let request = csr::new_csr(&waypoint_id)?;
    let valid = pki.ca.validate_csr(&request.csr_pem, Some(&waypoint_id))?;
    let now = std::time::SystemTime::now();
    let chain = pki.ca.sign_between(
        &valid,
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400),
    )?;
    std::fs::write(dir.join("cert.pem"), cert::chain_to_pem(&chain))?;
    std::fs::write(dir.join("key.pem"), request.private_key_pem())?;
    std::fs::write(
        dir.join("roots.pem"),
        cert::chain_to_pem(&pki.ca.trust_roots()),
    )?;
    let state = format!(
        r#"{{"workloads": [{{"uid": "web", "name": "web", "namespace": "bench", "serviceAccount": "web", "addresses": ["127.0.0.1"]}}],
 "services": [{{"name": "web", "namespace": "bench", "hostname": "web.bench.svc.cluster.local", "vips": ["10.96.0.10"],
   "ports": [{{"servicePort": 80, "targetPort": {}}}], "endpoints": [{{"workloadUid": "web"}}]}}]}}"#,
        backend.port()
    );
    std::fs::write(dir.join("state.json"), state)?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut child = tokio::process::Command::new(&waypoint_bin)
        .args([
            "--identity",
            &waypoint_id.to_string(),
            "--gateway",
            "bench/waypoint",
        ])
        .arg("--static-state")
        .arg(dir.join("state.json"))
        .arg("--cert")
        .arg(dir.join("cert.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("--ca-root-file")
        .arg(dir.join("roots.pem"))
        .args(["--listen", &listen.to_string()])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--readiness-addr", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--hbone-port", &hbone_port.to_string()])
        .args(
            args.worker_threads
                .iter()
                .flat_map(|n| ["--worker-threads".to_string(), n.to_string()]),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", waypoint_bin.display()))?;
    let pid = child.id().context("waypoint exited at once")?;
    let mut up = false;
    for _ in 0..100 {
        if TcpStream::connect(listen).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(up, "waypoint did not listen on {listen}");

    let pool = Pool::new(PoolConfig::default());
    let client_cert = pki.issue(&client_id);
    let direct = Path::Direct(backend);
    let hbone = Path::Tunnel {
        pool: pool.clone(),
        target: Box::new(ConnectTarget {
            source: client_id.clone(),
            tls: tls::client_config(&client_cert, &bundle, &pod_id)?,
            peer: SocketAddr::from(([127, 0, 0, 1], hbone_port)),
            expected_identity: pod_id.clone(),
            authority: backend,
            headers: http::HeaderMap::new(),
        }),
    };
    let waypoint = Path::Tunnel {
        pool: pool.clone(),
        target: Box::new(ConnectTarget {
            source: client_id.clone(),
            tls: tls::client_config(&client_cert, &bundle, &waypoint_id)?,
            peer: listen,
            expected_identity: waypoint_id.clone(),
            authority: "10.96.0.10:80".parse()?,
            headers: http::HeaderMap::new(),
        }),
    };

    // The layer-4 middle hop: the waypoint's identity and a pool of its own, as a waypoint
    // has.
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    let waypoint_cert = pki.issue(&waypoint_id);
    let relay = Server::new(
        relay_listener,
        tls::server_config(&waypoint_cert, &bundle)?,
        Relay {
            pool: Pool::new(PoolConfig::default()),
            next: ConnectTarget {
                source: waypoint_id.clone(),
                tls: tls::client_config(&waypoint_cert, &bundle, &pod_id)?,
                peer: SocketAddr::from(([127, 0, 0, 1], hbone_port)),
                expected_identity: pod_id.clone(),
                authority: backend,
                headers: http::HeaderMap::new(),
            },
        },
        ServerSettings::default(),
    );
    tokio::spawn(relay.run(std::future::pending()));
    let two_hops = Path::Tunnel {
        pool: pool.clone(),
        target: Box::new(ConnectTarget {
            source: client_id.clone(),
            tls: tls::client_config(&client_cert, &bundle, &waypoint_id)?,
            peer: relay_addr,
            expected_identity: waypoint_id.clone(),
            authority: backend,
            headers: http::HeaderMap::new(),
        }),
    };

    let mut lat = Vec::new();
    let mut rps = Vec::new();
    for (name, path) in [
        ("direct", &direct),
        ("hbone", &hbone),
        ("two hops", &two_hops),
        ("waypoint", &waypoint),
    ] {
        lat.push(
            latency(path, args.requests)
                .await
                .with_context(|| format!("latency {name}"))?,
        );
        rps.push(
            throughput(path, args.connections, args.per_connection)
                .await
                .with_context(|| format!("throughput {name}"))?,
        );
    }
    let (cpu0, _) = proc_usage(pid)?;
    let started = Instant::now();
    let served = paced(&waypoint, args.load_rate, args.load_seconds).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu1, rss) = proc_usage(pid)?;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);

    let row = |metric: &str, d: f64, m: f64| Row {
        metric: metric.to_string(),
        direct: d,
        measured: m,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (i, name) in [(1, "hbone"), (2, "two hops"), (3, "waypoint")] {
        print_table(
            &format!(
                "HTTP/1.1, 1 KB request and response bodies, loopback, {cores} cores: {name} vs direct ({} sequential requests; {} connections x {} requests)",
                args.requests, args.connections, args.per_connection
            ),
            name,
            &[
                row("latency p50, µs", micros(lat[0].percentile(50.0)), micros(lat[i].percentile(50.0))),
                row("latency p99, µs", micros(lat[0].percentile(99.0)), micros(lat[i].percentile(99.0))),
                row("requests/s", rps[0], rps[i]),
            ],
        );
        println!();
    }
    let p50s: Vec<f64> = lat.iter_mut().map(|l| micros(l.percentile(50.0))).collect();
    println!(
        "requests/s against one hop: two hops {:.2}, waypoint {:.2} (waypoint/two hops {:.2})",
        rps[2] / rps[1],
        rps[3] / rps[1],
        rps[3] / rps[2]
    );
    println!(
        "latency p50 added to one hop's: two hops {:.0} µs, waypoint {:.0} µs",
        p50s[2] - p50s[1],
        p50s[3] - p50s[1]
    );
    println!(
        "waypoint process ({}) at {:.0} req/s of 1 KB for {:.1} s: CPU {:.1}% of one core, RSS {:.1} MiB",
        args.worker_threads.map_or_else(
            || "worker threads: one per CPU".to_string(),
            |n| format!("--worker-threads {n}")
        ),
        served as f64 / elapsed,
        elapsed,
        (cpu1 - cpu0) / elapsed * 100.0,
        rss as f64 / 1024.0
    );
    Ok(())
}
