//! The floor of the side-by-side harness (`ztunnel_peer`): a proxy that only moves bytes.
//!
//! Run in each namespace of the pair under the same capture rules as the ztunnels, it does the
//! socket work every proxy in that position must do and nothing else: no TLS, no HTTP/2, no
//! policy. On the client side it accepts what the rules redirect to 15001, reads the original
//! destination (`SO_ORIGINAL_DST`), connects to that address's 15008 and sends the destination
//! ahead of the bytes (4 bytes of IPv4 address and 2 of port); on the server side it accepts
//! on 15008, reads those 6 bytes and connects to the destination. Both copy with tokio's
//! `copy_bidirectional_with_sizes` and 256 KiB buffers (ztunnel's largest read). It reads the
//! destination and dials with ztunnel's own socket code, so its sockets carry the proxies'
//! packet mark and the rules let them through.
//!
//! No proxy pair that encrypts and frames can beat this one on the same path and cores: its
//! figures are the most a ztunnel could reach there, which tells how much of a gap between two
//! ztunnels is theirs and how much is the path's.
//!
//! With `--tls-dir` the tunnel between the relays is TLS 1.3 with mutual SPIFFE certificates,
//! set up exactly as HBONE's (`ambit_hbone::tls`, rustls with ring), one handshake per
//! connection and still no HTTP/2: the least a proxy pair that keeps the mesh's promise does.
//!
//! Like the ztunnels, it answers readiness on 127.0.0.1:15021 (`/healthz/ready`) and counts
//! on 15020 (`/metrics`): `istio_tcp_connections_opened_total` (tunnels accepted on 15008) and
//! `istio_tcp_sent_bytes_total` (bytes to and from the destination), the names the harness reads
//! to prove that traffic went through the pair. Worker threads: `TOKIO_WORKER_THREADS`.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use ambit_bench::dedicated::{FloorSide, PACKET_MARK};
use ambit_hbone::cert::WorkloadCertificate;
use ambit_hbone::tls::{self, TrustBundle};
use ambit_hbone::Identity;
use ambit_ztunnel::capture::original_dst;
use ambit_ztunnel::capture::sockets::marked_socket;
use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Parser, Debug)]
#[command(about = "The floor of the side-by-side harness: a proxy that only moves bytes")]
struct Args {
    /// Wrap the tunnel in mutual TLS with the certificates in this directory, as the harness
    /// writes them: `<side>.pem` (chain), `<side>-key.pem` and `ca.pem`.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Which side of the pair this relay is: it presents that side's certificate and expects
    /// the other's.
    #[arg(long, value_enum, default_value_t = FloorSide::Client)]
    side: FloorSide,
}

const OUTBOUND_PORT: u16 = 15001;
const TUNNEL_PORT: u16 = 15008;
const METRICS_PORT: u16 = 15020;
const READY_PORT: u16 = 15021;
const BUFFER: usize = 256 * 1024;

#[derive(Default)]
struct Counters {
    tunnels: AtomicU64,
    bytes: AtomicU64,
}

/// How the tunnel between the relays is carried.
#[derive(Clone)]
enum Tunnel {
    Plain,
    Tls {
        connector: TlsConnector,
        acceptor: TlsAcceptor,
    },
}

/// Either end of a tunnel.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Tunnel {
    fn load(args: &Args) -> anyhow::Result<Tunnel> {
        let Some(dir) = &args.tls_dir else {
            return Ok(Tunnel::Plain);
        };
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let (me, other) = match args.side {
            FloorSide::Client => ("client", "server"),
            FloorSide::Server => ("server", "client"),
        };
        let roots = read("ca.pem")?;
        let cert = WorkloadCertificate::from_pem(
            &read(&format!("{me}.pem"))?,
            &read(&format!("{me}-key.pem"))?,
            &roots,
        )?;
        let bundle = TrustBundle::from_pem(cert.identity().trust_domain(), &roots)?;
        let expected = Identity::new(cert.identity().trust_domain(), "bench", other)?;
        Ok(Tunnel::Tls {
            connector: TlsConnector::from(tls::client_config(&cert, &bundle, &expected)?),
            acceptor: TlsAcceptor::from(tls::server_config(&cert, &bundle)?),
        })
    }

    async fn connect(&self, addr: SocketAddrV4) -> anyhow::Result<Box<dyn Io>> {
        let tcp = connect_marked(addr).await?;
        Ok(match self {
            Tunnel::Plain => Box::new(tcp),
            Tunnel::Tls { connector, .. } => Box::new(
                connector
                    .connect(tls::server_name(), tcp)
                    .await
                    .with_context(|| format!("TLS with {addr}"))?,
            ),
        })
    }

    async fn accept(&self, tcp: TcpStream) -> anyhow::Result<Box<dyn Io>> {
        Ok(match self {
            Tunnel::Plain => Box::new(tcp),
            Tunnel::Tls { acceptor, .. } => Box::new(
                acceptor
                    .accept(tcp)
                    .await
                    .context("TLS with a tunnel's client")?,
            ),
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tunnel = Tunnel::load(&args)?;
    let counters = Arc::new(Counters::default());
    let outbound = bind(OUTBOUND_PORT).await?;
    let tunnels = bind(TUNNEL_PORT).await?;
    let metrics = TcpListener::bind((Ipv4Addr::LOCALHOST, METRICS_PORT)).await?;
    let ready = TcpListener::bind((Ipv4Addr::LOCALHOST, READY_PORT)).await?;
    tokio::spawn(serve_http(metrics, {
        let counters = counters.clone();
        move || {
            format!(
                "istio_tcp_connections_opened_total {}\nistio_tcp_sent_bytes_total {}\n",
                counters.tunnels.load(Ordering::Relaxed),
                counters.bytes.load(Ordering::Relaxed)
            )
        }
    }));
    tokio::spawn(serve_http(ready, || "ready\n".to_owned()));
    tokio::spawn(accept(tunnels, {
        let counters = counters.clone();
        let tunnel = tunnel.clone();
        move |tcp| serve_tunnel(tcp, tunnel.clone(), counters.clone())
    }));
    accept(outbound, move |tcp| serve_outbound(tcp, tunnel.clone())).await;
    Ok(())
}

async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .await
        .with_context(|| format!("binding port {port}"))
}

/// Serves each accepted connection on its own task; a failed one is logged and dropped.
async fn accept<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                let served = serve(tcp);
                tokio::spawn(async move {
                    if let Err(e) = served.await {
                        eprintln!("floor_relay: {e:#}");
                    }
                });
            }
            Err(e) => eprintln!("floor_relay: accept: {e}"),
        }
    }
}

/// A connection the capture rules redirected: tunnel it to its destination's 15008.
async fn serve_outbound(mut tcp: TcpStream, tunnel: Tunnel) -> anyhow::Result<()> {
    let dst = original_dst(&tcp)
        .context("reading the original destination of a redirected connection")?;
    let SocketAddr::V4(dst) = dst else {
        bail!("{dst}: the floor carries IPv4 only");
    };
    let mut tunnel = tunnel
        .connect(SocketAddrV4::new(*dst.ip(), TUNNEL_PORT))
        .await?;
    let mut header = [0u8; 6];
    header[..4].copy_from_slice(&dst.ip().octets());
    header[4..].copy_from_slice(&dst.port().to_be_bytes());
    tunnel.write_all(&header).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut tunnel, BUFFER, BUFFER).await?;
    Ok(())
}

/// A tunnel from the other side's relay: connect to the destination it names and copy.
async fn serve_tunnel(
    tcp: TcpStream,
    tunnel: Tunnel,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    counters.tunnels.fetch_add(1, Ordering::Relaxed);
    let mut tcp = tunnel.accept(tcp).await?;
    let mut header = [0u8; 6];
    tcp.read_exact(&mut header)
        .await
        .context("reading a tunnel's destination")?;
    let ip = Ipv4Addr::new(header[0], header[1], header[2], header[3]);
    let port = u16::from_be_bytes([header[4], header[5]]);
    let upstream = connect_marked(SocketAddrV4::new(ip, port)).await?;
    // Counted as they are read: a connection that ends in a reset has still carried them.
    let mut upstream = Counted {
        inner: upstream,
        counters,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut upstream, BUFFER, BUFFER).await?;
    Ok(())
}

/// A stream that adds the bytes read from it and written to it to `counters.bytes`.
struct Counted<T> {
    inner: T,
    counters: Arc<Counters>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters.bytes.fetch_add(n, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects from ztunnel's own kind of socket: the proxies' packet mark, which the capture
/// rules let through, and no Nagle delay.
async fn connect_marked(addr: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let socket = marked_socket(SocketAddr::V4(addr), PACKET_MARK).context("a marked socket")?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket
        .connect(SocketAddr::V4(addr))
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// Answers every request on `listener` with 200 and `body()`.
async fn serve_http(listener: TcpListener, body: impl Fn() -> String + Clone + Send + 'static) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let text = body();
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
