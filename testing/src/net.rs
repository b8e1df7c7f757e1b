//! Loopback probes: a free port to hand a child process, and a plain HTTP/1.1 GET for the
//! metrics, readiness and admin endpoints every component serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;

/// How long a probe may take to connect, and to read the whole response.
const CONNECT: Duration = Duration::from_secs(2);
const READ: Duration = Duration::from_secs(5);

/// A free loopback port (bound, read, released) for a process the test starts. Another
/// process could take it in between; tests accept that rare race for the simplicity.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("binding a loopback port")?
        .local_addr()?
        .port())
}

/// `GET path` over HTTP/1.1 with `Connection: close`, blocking; returns the status code and
/// the whole response (head and body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT)
        .with_context(|| format!("GET {path}: connecting to {addr}"))?;
    s.set_read_timeout(Some(READ))?;
    s.write_all(request(path).as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("GET {path}: reading from {addr}"))?;
    Ok((status(&out)?, out))
}

/// [`http_get`] for async tests: the same request on tokio, bounded the same way.
pub async fn http_get_async(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        tcp.write_all(request(path).as_bytes()).await?;
        let mut out = String::new();
        tcp.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(CONNECT + READ, exchange)
        .await
        .context("timed out")
        .and_then(|r| r)
        .with_context(|| format!("GET {path} from {addr}"))?;
    Ok((status(&out)?, out))
}

fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
}

/// The status code of a response's first line.
fn status(response: &str) -> anyhow::Result<u16> {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {response:?}"))
}

/// The body of a whole response as [`http_get`] returns it (after the blank line).
pub fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_reads_status_and_body_from_a_real_socket() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || -> anyhow::Result<String> {
            let (mut s, _) = listener.accept()?;
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf)?;
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        let (code, whole) = http_get(addr, "/ready")?;
        assert_eq!(code, 503);
        assert_eq!(body(&whole), "busy");
        let asked = server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        assert!(asked.starts_with("GET /ready HTTP/1.1\r\n"), "{asked:?}");
        Ok(())
    }

    #[test]
    fn a_response_without_a_status_is_an_error() {
        assert!(status("garbage").is_err());
        assert_eq!(status("HTTP/1.1 200 OK\r\n\r\n").ok(), Some(200));
    }
}
