//! Access log: one line per connection, written when it ends, under tracing target
//! `access`.
//!
//! The line must explain a connection on its own: who talked to whom (addresses,
//! workloads, identities, service), which way and how (direction, protocol), how much
//! and how long, and how it ended (ok, refused with the reason policy or lookup gave,
//! or the error). Refusals are logged at `info` like successes, since an operator asking
//! "why was I denied?" reads exactly these lines; errors are `warn`.
//!
//! With `--log-format json` each line is one JSON object whose fields are those below
//! (`src.addr`, `dst.identity`, `bytes_sent`...).

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::Identity;

use crate::metrics::ResponseFlags;

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
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Hbone => "hbone",
            Protocol::Tcp => "tcp",
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
}

impl Outcome {
    fn kind(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused { .. } => "refused",
            Outcome::Error { .. } => "error",
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Ok => None,
            Outcome::Refused { reason } => Some(reason),
            Outcome::Error { error } => Some(error),
        }
    }
}

/// One side of the connection, as far as ztunnel knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `namespace/name` of the workload, when known.
    pub workload: Option<Arc<str>>,
    /// The peer's identity: authenticated by mTLS for the remote side, from discovery
    /// for the local one.
    pub identity: Option<Identity>,
}

impl Peer {
    /// A peer known only by address.
    pub fn from_addr(addr: SocketAddr) -> Self {
        Peer {
            addr,
            workload: None,
            identity: None,
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
    // tracing's macros need the level at compile time, hence the two arms.
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: TARGET,
                $level,
                src.addr = %entry.src.addr,
                src.workload = %OrDash(entry.src.workload.as_deref()),
                src.identity = %OrDash(entry.src.identity.as_ref()),
                dst.addr = %entry.dst.addr,
                dst.workload = %OrDash(entry.dst.workload.as_deref()),
                dst.identity = %OrDash(entry.dst.identity.as_ref()),
                dst.service = %OrDash(entry.service.as_deref()),
                direction = entry.direction.as_str(),
                protocol = entry.protocol.as_str(),
                bytes_sent = entry.bytes_sent,
                bytes_received = entry.bytes_received,
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
        Outcome::Ok | Outcome::Refused { .. } => emit!(tracing::Level::INFO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{self, CaptureWriter, LogFormat};

    fn entry(outcome: Outcome, flags: ResponseFlags) -> ConnectionLog {
        ConnectionLog {
            src: Peer {
                addr: "10.0.0.1:40000".parse().expect("addr"),
                workload: Some("default/sleep".into()),
                identity: Some(
                    "spiffe://cluster.local/ns/default/sa/sleep"
                        .parse()
                        .expect("id"),
                ),
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
        assert_eq!(ok["dst.identity"], "-");
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
