//! HBONE tunnel benchmark: the same loopback workloads over plain TCP and through one HBONE
//! tunnel (client pool -> mTLS HTTP/2 CONNECT -> HBONE server -> TCP to the same target),
//! measured in one run and printed as a table with tunnel/direct ratios.
//!
//! Workloads:
//! - bulk: one connection sends `--bulk-mib` MiB one way to a sink that answers with the
//!   byte count when the sender half-closes (throughput, MB/s);
//! - ping-pong: `--pings` round trips of 64 bytes on one connection to an echo server
//!   (request/response latency, p50/p99 µs);
//! - connect: `--connects` fresh connections (TCP connect, versus a new CONNECT stream on
//!   the pooled HBONE connection plus the server's TCP connect), p50/p99 µs.
//!
//! A measurement, not a test: nothing here asserts on timing. Run with
//! `cargo run --release -p ambit-bench --bin hbone_tunnel`; the h2 flags let windows and
//! frame sizes be compared without recompiling.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_bench::servers::{run_echo, run_sink, send_to_sink, Forward};
use ambit_bench::{mb_per_s, micros, print_table, Row, Samples};
use ambit_hbone::client::ConnectTarget;
use ambit_hbone::pool::{Pool, PoolConfig};
use ambit_hbone::server::{H2Settings, Server, ServerSettings};
use ambit_hbone::testing::TestPki;
use ambit_hbone::{tls, Identity};
use anyhow::Context as _;
use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// MiB sent one way in the bulk test.
    #[arg(long, default_value_t = 1024)]
    bulk_mib: u64,
    /// 64-byte round trips in the latency test (after 1,000 warm-up ones).
    #[arg(long, default_value_t = 20_000)]
    pings: usize,
    /// Fresh connections in the connect test.
    #[arg(long, default_value_t = 2_000)]
    connects: usize,
    /// HTTP/2 initial stream window, KiB.
    #[arg(long)]
    stream_window_kib: Option<u32>,
    /// HTTP/2 connection window, KiB.
    #[arg(long)]
    connection_window_kib: Option<u32>,
    /// HTTP/2 max frame size, KiB (16..=16383).
    #[arg(long)]
    frame_kib: Option<u32>,
    /// Per-stream h2 send buffer, KiB.
    #[arg(long)]
    send_buffer_kib: Option<usize>,
}

/// Either path, so the workloads are written once.
enum Path {
    Direct,
    Tunnel {
        pool: Pool,
        target: Box<ConnectTarget>,
    },
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

impl Path {
    async fn connect(&self, to: SocketAddr) -> anyhow::Result<Box<dyn Conn>> {
        Ok(match self {
            Path::Direct => {
                let tcp = TcpStream::connect(to).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            Path::Tunnel { pool, target } => {
                let mut target = (**target).clone();
                target.authority = to;
                Box::new(pool.connect(target).await?)
            }
        })
    }
}

async fn bulk(path: &Path, sink: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let mut conn = path.connect(sink).await?;
    send_to_sink(&mut *conn, bytes, 1024 * 1024).await
}

async fn ping_pong(path: &Path, echo: SocketAddr, n: usize) -> anyhow::Result<Samples> {
    let mut conn = path.connect(echo).await?;
    let ping = [0x42u8; 64];
    let mut pong = [0u8; 64];
    let mut samples = Samples::with_capacity(n);
    for i in 0..n + 1000 {
        let start = Instant::now();
        conn.write_all(&ping).await?;
        conn.read_exact(&mut pong).await?;
        if i >= 1000 {
            samples.record(start.elapsed());
        }
    }
    anyhow::ensure!(pong == ping, "echo returned different bytes");
    Ok(samples)
}

async fn connects(path: &Path, echo: SocketAddr, n: usize) -> anyhow::Result<Samples> {
    let mut samples = Samples::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let conn = path.connect(echo).await?;
        samples.record(start.elapsed());
        drop(conn);
    }
    Ok(samples)
}

fn h2_settings(args: &Args) -> H2Settings {
    let d = H2Settings::default();
    H2Settings {
        stream_window: args.stream_window_kib.map_or(d.stream_window, |k| k * 1024),
        connection_window: args
            .connection_window_kib
            .map_or(d.connection_window, |k| k * 1024),
        max_frame_size: args.frame_kib.map_or(d.max_frame_size, |k| k * 1024),
        max_send_buffer: args.send_buffer_kib.map_or(d.max_send_buffer, |k| k * 1024),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let h2 = h2_settings(&args);

    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let sink_listener = TcpListener::bind(loopback).await?;
    let sink = sink_listener.local_addr()?;
    tokio::spawn(run_sink(sink_listener));
    let echo_listener = TcpListener::bind(loopback).await?;
    let echo = echo_listener.local_addr()?;
    tokio::spawn(run_echo(echo_listener));

    let pki = TestPki::new("cluster.local");
    let client_id = Identity::new("cluster.local", "bench", "client")?;
    let server_id = Identity::new("cluster.local", "bench", "server")?;
    let server_tls = tls::server_config(&pki.issue(&server_id), &pki.bundle())?;
    let client_tls = tls::client_config(&pki.issue(&client_id), &pki.bundle(), &server_id)?;
    let hbone_listener = TcpListener::bind(loopback).await?;
    let server = Server::new(
        hbone_listener,
        server_tls,
        Forward,
        ServerSettings {
            h2,
            ..ServerSettings::default()
        },
    );
    let hbone = server.local_addr()?;
    tokio::spawn(server.run(std::future::pending()));

    let direct = Path::Direct;
    let tunnel = Path::Tunnel {
        pool: Pool::new(PoolConfig {
            h2,
            ..PoolConfig::default()
        }),
        target: Box::new(ConnectTarget {
            source: client_id,
            tls: client_tls,
            peer: hbone,
            expected_identity: server_id,
            authority: echo,
            headers: http::HeaderMap::new(),
        }),
    };
    // Open the pooled connection first so the tunnel numbers are for streams, as they are
    // in a running mesh (the handshake cost shows in the connect test's first sample only).
    drop(tunnel.connect(echo).await.context("warm-up tunnel")?);

    let bytes = args.bulk_mib * 1024 * 1024;
    let bulk_direct = bulk(&direct, sink, bytes).await.context("bulk direct")?;
    let bulk_tunnel = bulk(&tunnel, sink, bytes).await.context("bulk tunnel")?;
    let mut ping_direct = ping_pong(&direct, echo, args.pings)
        .await
        .context("ping direct")?;
    let mut ping_tunnel = ping_pong(&tunnel, echo, args.pings)
        .await
        .context("ping tunnel")?;
    let mut connect_direct = connects(&direct, echo, args.connects)
        .await
        .context("connect direct")?;
    let mut connect_tunnel = connects(&tunnel, echo, args.connects)
        .await
        .context("connect tunnel")?;

    let row = |metric: String, direct: f64, measured: f64| Row {
        metric,
        direct,
        measured,
    };
    let rows = vec![
        row(
            format!("bulk {} MiB one way, MB/s", args.bulk_mib),
            mb_per_s(bytes, bulk_direct),
            mb_per_s(bytes, bulk_tunnel),
        ),
        row(
            "ping-pong 64 B p50, µs".into(),
            micros(ping_direct.percentile(50.0)),
            micros(ping_tunnel.percentile(50.0)),
        ),
        row(
            "ping-pong 64 B p99, µs".into(),
            micros(ping_direct.percentile(99.0)),
            micros(ping_tunnel.percentile(99.0)),
        ),
        row(
            "connect p50, µs".into(),
            micros(connect_direct.percentile(50.0)),
            micros(connect_tunnel.percentile(50.0)),
        ),
        row(
            "connect p99, µs".into(),
            micros(connect_direct.percentile(99.0)),
            micros(connect_tunnel.percentile(99.0)),
        ),
    ];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    print_table(
        &format!(
            "HBONE tunnel vs direct TCP on loopback, one process, {cores} cores; h2 stream window {} KiB, connection window {} KiB, max frame {} KiB, send buffer {} KiB; {} pings, {} connects",
            h2.stream_window / 1024,
            h2.connection_window / 1024,
            h2.max_frame_size / 1024,
            h2.max_send_buffer / 1024,
            ping_tunnel.len(),
            connect_tunnel.len(),
        ),
        "tunnel",
        &rows,
    );
    Ok(())
}
