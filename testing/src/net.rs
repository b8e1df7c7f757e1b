//! Loopback probes: a free port to hand a child process, and a plain HTTP/1.1 GET for the
//! metrics, readiness and admin endpoints every component serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;

/// How long a probe may take to connect, and to read the whole response.
const CONNECT: Duration = Duration::from_secs(2);
const READ: Duration = Duration::from_secs(5);

/// Lowest port [`free_port`] hands out.
const PICK_FLOOR: u16 = 20_000;
/// The fewest ports below the ephemeral range worth picking from; with fewer, [`free_port`]
/// falls back to the kernel's choice.
const PICK_MIN_POOL: u16 = 1_000;

/// A free loopback TCP port (checked by binding it, then released) for a process the test
/// starts, taken from below the kernel's ephemeral range when there is room there.
///
/// A port from `bind(0)` comes from the ephemeral range, where every outgoing connection
/// also takes its local port: between the pick and the child's bind (or its bind again
/// after a restart, on the same port), any loopback connection of any test, a probe or a
/// ztunnel's stream to its controller, may be holding that port, and the child dies with
/// "Address already in use". The restart tests lost about one run in twenty-five that way.
/// Below the range only another pick can take it, and picks never repeat within a process
/// (they walk the range from a random start); concurrent test processes start apart.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

    let ceiling = ephemeral_floor().unwrap_or(32_768);
    let pool = ceiling.saturating_sub(PICK_FLOOR);
    if pool < PICK_MIN_POOL {
        return Ok(TcpListener::bind("127.0.0.1:0")
            .context("binding a loopback port")?
            .local_addr()?
            .port());
    }
    let start = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        (h.finish() % u64::from(pool)) as u32
    };
    // The first pick of the process chooses where its walk starts.
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..pool {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % u32::from(pool);
        let port = PICK_FLOOR + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {PICK_FLOOR}..{ceiling}")
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_floor() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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
    fn picked_ports_are_bindable_distinct_and_outside_the_ephemeral_range() -> anyhow::Result<()> {
        let floor = ephemeral_floor().context("the ephemeral range")?;
        let picks: Vec<u16> = (0..200).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut distinct = picks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), picks.len(), "a port was handed out twice");
        if floor - PICK_FLOOR >= PICK_MIN_POOL {
            assert!(
                picks.iter().all(|p| (PICK_FLOOR..floor).contains(p)),
                "{picks:?} strays into the ephemeral range from {floor}"
            );
        }
        // Free, for the child: a listener on a picked port binds.
        TcpListener::bind(("127.0.0.1", picks[0]))?;
        Ok(())
    }

    #[test]
    fn a_response_without_a_status_is_an_error() {
        assert!(status("garbage").is_err());
        assert_eq!(status("HTTP/1.1 200 OK\r\n\r\n").ok(), Some(200));
    }
}
