//! The request side of CONNECT-UDP (RFC 9298) over HTTP/2: an extended `CONNECT` (RFC 8441)
//! with `:protocol connect-udp`, whose target is in the path
//! `/.well-known/masque/udp/{target_host}/{target_port}/`, and `capsule-protocol: ?1`.
//! The datagrams then travel on the stream as capsules ([`crate::capsule`]).
//!
//! HBONE sends literal addresses only, as for TCP: the path's host is an IPv4 dotted quad or
//! an IPv6 address with its colons percent-encoded (`fd00%3A%3A1`, RFC 9298 section 2), and
//! `:authority` is the same `ip:port`, so one pooled connection and the server's checks
//! treat both kinds of tunnel alike. A path naming a host name is refused: the client
//! already resolved it, and resolving here would let it steer the server's DNS.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderName, HeaderValue};

/// The `:protocol` pseudo-header value of CONNECT-UDP.
pub const PROTOCOL: &str = "connect-udp";

/// The header announcing the capsule protocol (RFC 9297 section 3.4).
pub const CAPSULE_PROTOCOL: HeaderName = HeaderName::from_static("capsule-protocol");

/// Its only value: a structured-field boolean true.
pub const CAPSULE_PROTOCOL_TRUE: HeaderValue = HeaderValue::from_static("?1");

const PREFIX: &str = "/.well-known/masque/udp/";

/// What a tunnel carries: a TCP byte stream (`CONNECT`) or UDP datagrams (CONNECT-UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelProtocol {
    /// Plain `CONNECT`: the stream's bytes are the TCP connection's bytes.
    Tcp,
    /// CONNECT-UDP: the stream carries DATAGRAM capsules.
    Udp,
}

impl TunnelProtocol {
    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelProtocol::Tcp => "tcp",
            TunnelProtocol::Udp => "udp",
        }
    }
}

/// The request path naming `target`.
pub fn path(target: SocketAddr) -> String {
    let host = match target.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => ip.to_string().replace(':', "%3A"),
    };
    format!("{PREFIX}{host}/{}/", target.port())
}

/// The target a request path names, or why it names none.
pub fn parse_path(path: &str) -> Result<SocketAddr, String> {
    let rest = path
        .strip_prefix(PREFIX)
        .ok_or_else(|| format!("path {path:?} is not under {PREFIX}"))?;
    let mut parts = rest.split('/');
    let (Some(host), Some(port), Some(""), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "path {path:?} is not {PREFIX}{{target_host}}/{{target_port}}/"
        ));
    };
    // Percent-encoded colons are the only escape an address needs; either case is valid.
    let host = host.replace("%3A", ":").replace("%3a", ":");
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("target host {host:?} is not a literal IP address"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("target port {port:?} is not a port number"))?;
    if port == 0 {
        return Err("target port is 0".into());
    }
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_both_families() {
        for target in ["10.0.0.7:53", "[fd00::1]:5353", "[::ffff:10.0.0.1]:9"] {
            let target: SocketAddr = target.parse().unwrap();
            assert_eq!(parse_path(&path(target)), Ok(target), "{}", path(target));
        }
        assert_eq!(
            path("10.0.0.7:53".parse().unwrap()),
            "/.well-known/masque/udp/10.0.0.7/53/"
        );
        assert_eq!(
            path("[fd00::1]:53".parse().unwrap()),
            "/.well-known/masque/udp/fd00%3A%3A1/53/"
        );
        assert_eq!(
            parse_path("/.well-known/masque/udp/fd00%3a%3a1/53/"),
            Ok("[fd00::1]:53".parse().unwrap())
        );
    }

    #[test]
    fn malformed_paths_are_refused() {
        for bad in [
            "/",
            "/.well-known/masque/udp/10.0.0.7/53",
            "/.well-known/masque/udp/10.0.0.7/53/x",
            "/.well-known/masque/udp/example.com/53/",
            "/.well-known/masque/udp/10.0.0.7/0/",
            "/.well-known/masque/udp/10.0.0.7/65536/",
            "/.well-known/masque/udp/10.0.0.7//",
            "/.well-known/masque/udp/[fd00::1]/53/",
            "/.well-known/masque/ip/10.0.0.7/53/",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }
}
