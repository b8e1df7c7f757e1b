//! Access log: one line per connection, written when it ends, under tracing target
//! `access`.
//!
//! The line must explain a connection on its own: who talked to whom (addresses,
//! workloads, identities, service), which way and how (direction, protocol), how much
//! and how long, and how it ended (ok, refused with the reason policy or lookup gave,
//! closed later by a policy change, or the error). Refusals are logged at `info` like
//! successes, since an operator asking "why was I denied?" reads exactly these lines;
//! errors are `warn`.
//!
//! Identities are audit facts, so only proven ones are written ([`PeerIdentity`]):
//! `src.identity` / `dst.identity` hold an identity proven by mTLS (or the local pod's own),
//! else `unknown`; `src.workload` / `dst.workload` name the workload behind a proven
//! identity. For a peer nothing proves (plaintext), the workload its address belongs to is
//! written as `src.workload_by_ip` instead, so that nobody reads a lookup as an identity.
//!
//! With `--log-format json` each line is one JSON object whose fields are those below
//! (`src.addr`, `dst.identity`, `bytes_sent`...).

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{ResponseFlags, UNKNOWN};
use crate::peer::PeerIdentity;

/// The tracing target of access-log events.
pub const TARGET: &str = "access";

/// Which way the connection went, relative to the local workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A local workload connecting out.
    Outbound,
    /// A connection arriving for a local workload.
    Inbound,
}

impl Direction {
    pub fn as_str(&self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How the bytes travelled between the proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Through an HBONE tunnel (mTLS, HTTP/2 CONNECT).
    Hbone,
    /// Plain TCP (the peer is outside the mesh).
    Tcp,
    /// A UDP flow through a CONNECT-UDP tunnel (mTLS, HTTP/2 extended CONNECT).
    ConnectUdp,
    /// A UDP flow sent in plaintext (the destination is outside the mesh).
    Udp,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Hbone => "hbone",
            Protocol::Tcp => "tcp",
            Protocol::ConnectUdp => "connect-udp",
            Protocol::Udp => "udp",
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The tunnel opened and the connection ended normally.
    Ok,
    /// ztunnel refused the connection on purpose (policy, unknown destination...).
    Refused {
        /// Why, in words an operator can act on.
        reason: Cow<'static, str>,
    },
    /// Something failed (connect error, TLS failure, reset...).
    Error {
        /// The error, with its causes.
        error: String,
    },
    /// The connection was open when a policy change denied it, so ztunnel closed it.
    Revoked {
        /// The new decision, naming the policy and rule.
        reason: String,
    },
}

impl Outcome {
    fn kind(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused { .. } => "refused",
            Outcome::Error { .. } => "error",
            Outcome::Revoked { .. } => "revoked",
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Ok => None,
            Outcome::Refused { reason } => Some(reason),
            Outcome::Error { error } => Some(error),
            Outcome::Revoked { reason } => Some(reason),
        }
    }
}

/// One side of the connection, as far as ztunnel knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Who it is, and whether that was proven.
    pub identity: PeerIdentity,
}

impl Peer {
    /// A peer known only by address.
    pub fn from_addr(addr: SocketAddr) -> Self {
        Peer {
            addr,
            identity: PeerIdentity::Unverified { by_ip: None },
        }
    }

    fn workload(&self) -> Option<String> {
        self.identity
            .workload()
            .map(|w| format!("{}/{}", w.namespace, w.name))
    }

    fn workload_by_ip(&self) -> Option<String> {
        self.identity
            .workload_by_ip()
            .map(|w| format!("{}/{}", w.namespace, w.name))
    }

    fn identity(&self) -> String {
        match self.identity.identity() {
            Some(id) => id.to_string(),
            None => UNKNOWN.to_string(),
        }
    }
}

/// Everything one access-log line says about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLog {
    pub src: Peer,
    pub dst: Peer,
    /// The service host name, when the client addressed a service.
    pub service: Option<Arc<str>>,
    pub direction: Direction,
    pub protocol: Protocol,
    /// Bytes sent towards the destination.
    pub bytes_sent: u64,
    /// Bytes received from the destination.
    pub bytes_received: u64,
    pub duration: Duration,
    pub outcome: Outcome,
    pub response_flags: ResponseFlags,
    /// For a UDP flow: datagrams (sent towards the destination, received from it).
    pub datagrams: Option<(u64, u64)>,
}

/// Displays an optional value as `-` when absent, the access-log convention.
struct OrDash<'a, T: ?Sized>(Option<&'a T>);

impl<T: fmt::Display + ?Sized> fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Writes `entry` as one event under target [`TARGET`].
pub fn log(entry: &ConnectionLog) {
    let (src_workload, src_by_ip) = (entry.src.workload(), entry.src.workload_by_ip());
    let (dst_workload, dst_by_ip) = (entry.dst.workload(), entry.dst.workload_by_ip());
    // tracing's macros need the level at compile time, hence the two arms.
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: TARGET,
                $level,
                src.addr = %entry.src.addr,
                src.workload = %OrDash(src_workload.as_deref()),
                src.workload_by_ip = src_by_ip.as_deref(),
                src.identity = %entry.src.identity(),
                dst.addr = %entry.dst.addr,
                dst.workload = %OrDash(dst_workload.as_deref()),
                dst.workload_by_ip = dst_by_ip.as_deref(),
                dst.identity = %entry.dst.identity(),
                dst.service = %OrDash(entry.service.as_deref()),
                direction = entry.direction.as_str(),
                protocol = entry.protocol.as_str(),
                bytes_sent = entry.bytes_sent,
                bytes_received = entry.bytes_received,
                datagrams_sent = entry.datagrams.map(|d| d.0),
                datagrams_received = entry.datagrams.map(|d| d.1),
                duration_ms = entry.duration.as_millis() as u64,
                outcome = entry.outcome.kind(),
                reason = entry.outcome.reason(),
                response_flags = entry.response_flags.as_str(),
                "connection complete"
            )
        };
    }
    match entry.outcome {
        Outcome::Error { .. } => emit!(tracing::Level::WARN),
        Outcome::Ok | Outcome::Refused { .. } | Outcome::Revoked { .. } => {
            emit!(tracing::Level::INFO)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{fixtures, Workload};
    use crate::telemetry::{self, CaptureWriter, LogFormat};

    fn workload(ns: &str, name: &str, sa: &str, ip: &str) -> Arc<Workload> {
        Arc::new(Workload::try_from(fixtures::workload(ns, name, sa, "n1", ip)).expect("workload"))
    }

    fn entry(outcome: Outcome, flags: ResponseFlags) -> ConnectionLog {
        let sleep = workload("default", "sleep", "sleep", "10.0.0.1");
        ConnectionLog {
            src: Peer {
                addr: "10.0.0.1:40000".parse().expect("addr"),
                identity: PeerIdentity::verified(sleep.identity.clone(), Some(&sleep)),
            },
            dst: Peer::from_addr("10.0.1.2:8080".parse().expect("addr")),
            service: Some("echo.default.svc.cluster.local".into()),
            direction: Direction::Outbound,
            protocol: Protocol::Hbone,
            bytes_sent: 12,
            bytes_received: 3456,
            duration: Duration::from_millis(1500),
            outcome,
            response_flags: flags,
            datagrams: None,
        }
    }

    fn json_lines(out: &CaptureWriter) -> Vec<serde_json::Value> {
        out.contents()
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }

    #[test]
    fn json_line_carries_every_field() {
        let out = CaptureWriter::new();
        let (dispatch, _) = telemetry::build(LogFormat::Json, "info", out.clone()).expect("build");
        tracing::dispatcher::with_default(&dispatch, || {
            log(&entry(Outcome::Ok, ResponseFlags::None));
            log(&entry(
                Outcome::Refused {
                    reason: "denied by policy default/deny-sleep".into(),
                },
                ResponseFlags::Denied,
            ));
        });
        let lines = json_lines(&out);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let ok = &lines[0];
        assert_eq!(ok["target"], "access");
        assert_eq!(ok["level"], "INFO");
        assert_eq!(ok["src.addr"], "10.0.0.1:40000");
        assert_eq!(ok["src.workload"], "default/sleep");
        assert_eq!(
            ok["src.identity"],
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(ok["dst.addr"], "10.0.1.2:8080");
        assert_eq!(ok["dst.workload"], "-");
        assert_eq!(ok["dst.identity"], "unknown");
        assert!(ok.get("src.workload_by_ip").is_none(), "{ok}");
        assert_eq!(ok["dst.service"], "echo.default.svc.cluster.local");
        assert_eq!(ok["direction"], "outbound");
        assert_eq!(ok["protocol"], "hbone");
        assert_eq!(ok["bytes_sent"], 12);
        assert_eq!(ok["bytes_received"], 3456);
        assert_eq!(ok["duration_ms"], 1500);
        assert_eq!(ok["outcome"], "ok");
        assert_eq!(ok["response_flags"], "-");
        assert!(ok.get("reason").is_none(), "{ok}");

        let refused = &lines[1];
        assert_eq!(refused["outcome"], "refused");
        assert_eq!(refused["reason"], "denied by policy default/deny-sleep");
        assert_eq!(refused["response_flags"], "RBAC");
    }

    #[test]
    fn a_plaintext_peer_is_unknown_and_its_address_owner_is_only_a_hint() {
        let legacy = workload("legacy", "old", "default", "10.0.0.9");
        let server = workload("app", "srv", "srv", "10.0.1.2");
        let mut line = entry(Outcome::Ok, ResponseFlags::None);
        line.src = Peer {
            addr: "10.0.0.9:5555".parse().expect("addr"),
            identity: PeerIdentity::unverified(Some(&legacy)),
        };
        line.dst = Peer {
            addr: "10.0.1.2:8080".parse().expect("addr"),
            identity: PeerIdentity::verified(server.identity.clone(), Some(&server)),
        };
        line.direction = Direction::Inbound;
        line.protocol = Protocol::Tcp;
        let out = CaptureWriter::new();
        let (dispatch, _) = telemetry::build(LogFormat::Json, "info", out.clone()).expect("build");
        tracing::dispatcher::with_default(&dispatch, || log(&line));
        let lines = json_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["src.identity"], "unknown");
        assert_eq!(l["src.workload"], "-");
        assert_eq!(l["src.workload_by_ip"], "legacy/old");
        assert_eq!(l["dst.identity"], "spiffe://cluster.local/ns/app/sa/srv");
        assert_eq!(l["dst.workload"], "app/srv");
        assert!(
            !out.contents().contains("ns/legacy/sa/default"),
            "a guessed identity was written: {}",
            out.contents()
        );
    }

    #[test]
    fn a_revoked_connection_says_so_and_why() {
        let out = CaptureWriter::new();
        let (dispatch, _) = telemetry::build(LogFormat::Json, "info", out.clone()).expect("build");
        tracing::dispatcher::with_default(&dispatch, || {
            log(&entry(
                Outcome::Revoked {
                    reason: "policy changed: denied by app/deny-client (rule 0)".into(),
                },
                ResponseFlags::Denied,
            ))
        });
        let lines = json_lines(&out);
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["outcome"], "revoked");
        assert_eq!(
            lines[0]["reason"],
            "policy changed: denied by app/deny-client (rule 0)"
        );
        assert_eq!(lines[0]["response_flags"], "RBAC");
    }

    #[test]
    fn errors_are_warnings_and_access_can_be_silenced() {
        let out = CaptureWriter::new();
        let (dispatch, handle) =
            telemetry::build(LogFormat::Json, "info", out.clone()).expect("build");
        tracing::dispatcher::with_default(&dispatch, || {
            log(&entry(
                Outcome::Error {
                    error: "connection refused".into(),
                },
                ResponseFlags::UpstreamConnectionFailure,
            ));
            handle.set("info,access=off").expect("filter");
            log(&entry(Outcome::Ok, ResponseFlags::None));
        });
        let lines: Vec<_> = json_lines(&out)
            .into_iter()
            .filter(|l| l["target"] == "access")
            .collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["outcome"], "error");
        assert_eq!(lines[0]["reason"], "connection refused");
        assert_eq!(lines[0]["response_flags"], "UF");
    }
}
