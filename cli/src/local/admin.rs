//! Plain HTTP/1.1 GETs to the components' ops ports (admin 15000, readiness 15021, metrics
//! 15020/15014) *inside* their namespaces: the socket is created and connected on a thread
//! that entered the namespace ([`net::in_netns`]), and the request is then made from the
//! caller's thread (a socket stays in the namespace it was created in). Admin ports listen on
//! loopback only, so this is the one way to reach them without exposing them.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::net;

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// Connecting, writing or reading failed.
    #[error("{addr} in namespace {netns}: {source}")]
    Io {
        netns: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP.
    #[error("{addr} in namespace {netns} answered something that is not HTTP")]
    NotHttp { netns: String, addr: SocketAddr },
}

/// GETs `path` from `addr` inside `netns`; returns the status code and body.
pub fn get(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), AdminError> {
    let timeout = Duration::from_secs(3);
    let io = |source| AdminError::Io {
        netns: netns.to_owned(),
        addr,
        source,
    };
    let mut stream =
        net::in_netns(netns, move || TcpStream::connect_timeout(&addr, timeout))?.map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let not_http = || AdminError::NotHttp {
        netns: netns.to_owned(),
        addr,
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(not_http)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(not_http)?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// Decodes a chunked body (the ops servers stream some answers).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(next)) = (after.get(..n), after.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        rest = next.trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
