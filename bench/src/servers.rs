//! The far ends every benchmark needs: a sink that counts what it receives, an echo server,
//! the HBONE destination side of a node proxy without policy (connect, then copy), and an
//! HBONE hop that only relays (terminate, then open the next tunnel and copy).

use ambit_hbone::client::ConnectTarget;
use ambit_hbone::copy::copy_bidirectional;
use ambit_hbone::pool::Pool;
use ambit_hbone::server::{ConnectRequest, Handler, Refusal};
use ambit_hbone::stream::TunnelStream;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sink: reads to EOF, then writes the byte count (8 bytes, big endian).
pub async fn run_sink(listener: TcpListener) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = tcp.write_all(&total.to_be_bytes()).await;
            let _ = tcp.shutdown().await;
        });
    }
}

/// The client side of [`run_sink`]: writes `bytes` in chunks of `chunk`, closes its side and
/// checks the sink's count; returns the time from the first byte to the count.
pub async fn send_to_sink(
    conn: &mut (impl AsyncRead + AsyncWrite + Unpin + ?Sized),
    bytes: u64,
    chunk: usize,
) -> anyhow::Result<Duration> {
    let buf = vec![0x5au8; chunk];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        conn.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    conn.shutdown().await?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count).await?;
    let elapsed = start.elapsed();
    let got = u64::from_be_bytes(count);
    anyhow::ensure!(got == bytes, "sink received {got} of {bytes} bytes");
    Ok(elapsed)
}

/// Echo: writes back whatever it reads.
pub async fn run_echo(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// What a node proxy's inbound side does, minus policy: connect to the authority (503 if
/// that fails), then copy.
pub struct Forward;

impl Handler for Forward {
    type Accepted = TcpStream;

    async fn accept(&self, request: &ConnectRequest) -> Result<TcpStream, Refusal> {
        let tcp = TcpStream::connect(request.authority)
            .await
            .map_err(|e| Refusal::Unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn serve(&self, mut upstream: TcpStream, mut stream: TunnelStream) {
        let _ = copy_bidirectional(&mut stream, &mut upstream).await;
    }
}

/// A middle HBONE hop at layer 4: terminates each tunnel and opens one to the same authority
/// through `next` (its `authority` replaced), then copies. What a waypoint's two hops cost
/// without anything it does with HTTP.
pub struct Relay {
    pub pool: Pool,
    pub next: ConnectTarget,
}

impl Handler for Relay {
    type Accepted = TunnelStream;

    async fn accept(&self, request: &ConnectRequest) -> Result<TunnelStream, Refusal> {
        let mut next = self.next.clone();
        next.authority = request.authority;
        self.pool
            .connect(next)
            .await
            .map_err(|e| Refusal::Unreachable(e.to_string()))
    }

    async fn serve(&self, mut upstream: TunnelStream, mut stream: TunnelStream) {
        let _ = copy_bidirectional(&mut stream, &mut upstream).await;
    }
}
