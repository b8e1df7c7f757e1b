//! The two ends of the hand-over socket: [`Server`] in the running ztunnel, [`take_over`] in
//! its successor.
//!
//! ```text
//! successor                              running ztunnel
//!   Hello {pid, want: listeners}  ---->
//!                                 <----  Offer {pid, total, listeners[..32]} + SCM_RIGHTS
//!                                 <----  Offer ... (until `total` descriptions arrived)
//!   (serves on them; readiness)           (keeps accepting on the same sockets meanwhile)
//!   Done {adopted}                ---->  stops accepting, drains, exits
//! ```
//!
//! `want: drain_only` (the forced fallback), a version the running ztunnel does not speak
//! (it answers `Refuse`), or an offer the successor cannot use (it answers `Refuse`) all end
//! the same way: the successor binds its own listeners (SO_REUSEPORT) and, once it serves,
//! sends `Drain`. A successor that disconnects before `Done`/`Drain` changes nothing: the
//! running ztunnel keeps serving and waits for the next one. Only a peer with our own user
//! id is served (the socket also lives in the owner-only node directory).

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use serde::{Deserialize, Serialize};

use super::wire::{Conn, Kind, WireError, MAX_FDS, VERSION};
use super::{Descriptor, Inherited, Registry};

/// Deadline of each step of the exchange (a frame to arrive or leave).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the running ztunnel waits for its successor to serve (it keeps serving meanwhile).
pub const SERVE_WAIT: Duration = Duration::from_secs(600);
/// Most listeners one offer may announce (a node with thousands of pods, both families).
pub const MAX_LISTENERS: usize = 16384;

/// Why the hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The hand-over socket could not be made or reached.
    #[error("hand-over socket {}: {op} failed", path.display())]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// Which step.
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving a frame failed.
    #[error("hand-over exchange failed")]
    Wire(#[source] WireError),
    /// The peer speaks another version of the protocol.
    #[error("the peer speaks hand-over version {theirs}; this ztunnel speaks {VERSION}")]
    Version {
        /// The peer's version.
        theirs: u16,
    },
    /// A frame that does not belong at this step.
    #[error("got a {got:?} frame while waiting for {expected}")]
    Unexpected {
        /// What came.
        got: Kind,
        /// What was awaited.
        expected: &'static str,
    },
    /// A body that is not what its kind says.
    #[error("malformed {what} body")]
    Body {
        /// Which frame.
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// An offer that contradicts itself.
    #[error("inconsistent offer: {0}")]
    Offer(String),
    /// The peer refused to go on.
    #[error("the peer refused: {0}")]
    Refused(String),
    /// The peer runs as another user.
    #[error("the peer runs as uid {peer}, not {ours}")]
    Credentials {
        /// The peer's uid.
        peer: u32,
        /// Ours.
        ours: u32,
    },
}

impl From<WireError> for HandoverError {
    fn from(e: WireError) -> Self {
        HandoverError::Wire(e)
    }
}

/// What the successor asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Want {
    /// The listening sockets.
    Listeners,
    /// Nothing: it binds its own and will send `Drain`.
    DrainOnly,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    pid: u32,
    want: Want,
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    pid: u32,
    total: u32,
    listeners: Vec<Descriptor>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    adopted: Vec<u32>,
}

fn body<T: serde::de::DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, HandoverError> {
    serde_json::from_slice(b).map_err(|source| HandoverError::Body { what, source })
}

fn json(v: &impl Serialize) -> Vec<u8> {
    // Our own plain structs of strings and numbers: serialization cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn check_peer(conn: &Conn) -> Result<(), HandoverError> {
    let cred = rustix::net::sockopt::socket_peercred(conn.as_fd()).map_err(|e| {
        HandoverError::Wire(WireError::Io {
            op: "read peer credentials",
            source: e.into(),
        })
    })?;
    let ours = nix::unistd::geteuid().as_raw();
    let peer = cred.uid.as_raw();
    if peer != ours {
        return Err(HandoverError::Credentials { peer, ours });
    }
    Ok(())
}

/// How the running ztunnel was succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Succession {
    /// The successor serves on the listeners we handed over.
    HandedOver {
        /// Its pid.
        pid: u32,
        /// Listeners offered.
        offered: usize,
        /// Listeners it took.
        adopted: usize,
    },
    /// The successor serves on listeners of its own (the fallback).
    Replaced {
        /// Its pid, when it said hello.
        pid: Option<u32>,
    },
}

/// The running ztunnel's end: a listening `SOCK_SEQPACKET` socket at `handover.sock`. It is
/// served from a thread of its own ([`Server::serve`] blocks), so a successor is answered
/// whatever the runtime is doing, and the process can exit while it waits.
#[derive(Debug)]
pub struct Server {
    listener: OwnedFd,
    path: PathBuf,
}

impl Server {
    /// Binds at `path`: under a temporary name first, then renamed over whatever is there (a
    /// predecessor's socket), so a successor finds either socket, never none.
    pub fn bind(path: &Path) -> Result<Server, HandoverError> {
        let err = |op, source| HandoverError::Socket {
            path: path.to_path_buf(),
            op,
            source,
        };
        let tmp = path.with_extension(format!("sock.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| err("socket", e.into()))?;
        let addr = SocketAddrUnix::new(&tmp).map_err(|e| err("name", e.into()))?;
        rustix::net::bind(&fd, &addr).map_err(|e| err("bind", e.into()))?;
        rustix::net::listen(&fd, 8).map_err(|e| err("listen", e.into()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err("chmod", e))?;
        std::fs::rename(&tmp, path).map_err(|e| err("rename into place", e))?;
        Ok(Server {
            listener: fd,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves successors, one at a time, until one takes over; `registry` is what is offered.
    /// A failed session is logged and changes nothing. Blocks: run it on a thread of its own.
    pub fn serve(self, registry: Registry) -> Succession {
        loop {
            let fd = match rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(e) if e == rustix::io::Errno::INTR => continue,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "hand-over accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            match session(fd, &registry) {
                Ok(Some(succession)) => return succession,
                Ok(None) => tracing::info!("the successor left before taking over; still serving"),
                Err(e) => tracing::warn!(
                    error = %crate::telemetry::error_chain(&e),
                    "hand-over to a successor failed; still serving"
                ),
            }
        }
    }
}

/// One successor: `Ok(None)` if it went away without taking over.
fn session(fd: OwnedFd, registry: &Registry) -> Result<Option<Succession>, HandoverError> {
    let conn = Conn::new(fd);
    check_peer(&conn)?;
    let hello = conn.recv("hello", STEP_TIMEOUT)?;
    match hello.kind {
        Kind::Hello => {}
        Kind::Drain => return Ok(Some(Succession::Replaced { pid: None })),
        got => {
            return Err(HandoverError::Unexpected {
                got,
                expected: "hello",
            })
        }
    }
    if hello.version != VERSION {
        let e = HandoverError::Version {
            theirs: hello.version,
        };
        tracing::warn!(error = %e, "successor speaks another hand-over version; it binds its own listeners");
        conn.send(Kind::Refuse, e.to_string().as_bytes(), &[], STEP_TIMEOUT)?;
        return wait_for_drain(&conn, None);
    }
    let hello: Hello = match body("hello", &hello.body) {
        Ok(h) => h,
        Err(e) => {
            let _ = conn.send(Kind::Refuse, e.to_string().as_bytes(), &[], STEP_TIMEOUT);
            return Err(e);
        }
    };
    tracing::info!(successor = hello.pid, want = ?hello.want, "a successor ztunnel connected");
    if hello.want == Want::DrainOnly {
        return wait_for_drain(&conn, Some(hello.pid));
    }
    let offered = registry
        .snapshot()
        .map_err(|source| HandoverError::Socket {
            path: PathBuf::from("(registry)"),
            op: "duplicate listeners",
            source,
        })?;
    let total = offered.len();
    let pid = std::process::id();
    let mut batches = offered.chunks(MAX_FDS).peekable();
    if batches.peek().is_none() {
        let offer = Offer {
            pid,
            total: 0,
            listeners: Vec::new(),
        };
        conn.send(Kind::Offer, &json(&offer), &[], STEP_TIMEOUT)?;
    }
    for batch in batches {
        let offer = Offer {
            pid,
            total: total as u32,
            listeners: batch.iter().map(|(d, _)| d.clone()).collect(),
        };
        let fds: Vec<_> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
        conn.send(Kind::Offer, &json(&offer), &fds, STEP_TIMEOUT)?;
    }
    tracing::info!(
        successor = hello.pid,
        listeners = total,
        "listeners handed over; serving until the successor does"
    );
    loop {
        let frame = match conn.recv("done", SERVE_WAIT) {
            Ok(f) => f,
            Err(WireError::Closed) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match frame.kind {
            Kind::Done => {
                let done: Done = body("done", &frame.body)?;
                return Ok(Some(Succession::HandedOver {
                    pid: hello.pid,
                    offered: total,
                    adopted: done.adopted.len(),
                }));
            }
            Kind::Drain => {
                return Ok(Some(Succession::Replaced {
                    pid: Some(hello.pid),
                }))
            }
            Kind::Refuse => tracing::warn!(
                reason = %String::from_utf8_lossy(&frame.body),
                "the successor cannot use the handed listeners; it binds its own"
            ),
            got => {
                return Err(HandoverError::Unexpected {
                    got,
                    expected: "done",
                })
            }
        }
    }
}

/// Waits for the (frozen) `Drain` frame of a successor binding its own listeners.
fn wait_for_drain(conn: &Conn, pid: Option<u32>) -> Result<Option<Succession>, HandoverError> {
    loop {
        match conn.recv("drain", SERVE_WAIT) {
            Ok(f) if f.kind == Kind::Drain => return Ok(Some(Succession::Replaced { pid })),
            Ok(f) if f.kind == Kind::Refuse => continue,
            Ok(f) => {
                return Err(HandoverError::Unexpected {
                    got: f.kind,
                    expected: "drain",
                })
            }
            Err(WireError::Closed) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The successor's end of a session, kept until it serves.
#[derive(Debug)]
pub struct Session {
    conn: Conn,
}

impl Session {
    /// Tells the running ztunnel we serve on its listeners (`adopted`: their offer ids).
    pub fn done(self, adopted: Vec<u32>) -> Result<(), HandoverError> {
        let done = Done { adopted };
        self.conn
            .send(Kind::Done, &json(&done), &[], STEP_TIMEOUT)?;
        Ok(())
    }

    /// Tells the running ztunnel we serve on listeners of our own.
    pub fn drain(self) -> Result<(), HandoverError> {
        self.conn.send(Kind::Drain, b"", &[], STEP_TIMEOUT)?;
        Ok(())
    }
}

/// What a starting ztunnel found.
#[derive(Debug)]
pub enum Predecessor {
    /// No ztunnel to take over from (or none reachable): bind and serve.
    None {
        /// Why, for the log.
        reason: String,
    },
    /// Its listeners: serve on them, then [`Session::done`].
    Listeners {
        session: Session,
        inherited: Inherited,
        /// Its pid.
        pid: u32,
    },
    /// A ztunnel that keeps its listeners: bind ours beside them (SO_REUSEPORT), then
    /// [`Session::drain`].
    DrainOnly {
        session: Session,
        /// Why no listeners were taken.
        reason: String,
    },
}

/// Connects to the running ztunnel at `path` and asks for `want`. Never fails: every problem
/// becomes a [`Predecessor`] that falls back to binding, with the reason. Blocks for at most a
/// few [`STEP_TIMEOUT`]s.
pub fn take_over(path: &Path, want: Want) -> Predecessor {
    let fd = match connect(path) {
        Ok(fd) => fd,
        Err(e) => {
            return Predecessor::None {
                reason: crate::telemetry::error_chain(&e),
            }
        }
    };
    let conn = Conn::new(fd);
    let hello = Hello {
        pid: std::process::id(),
        want,
    };
    if let Err(e) = conn.send(Kind::Hello, &json(&hello), &[], STEP_TIMEOUT) {
        return Predecessor::None {
            reason: crate::telemetry::error_chain(&e),
        };
    }
    if want == Want::DrainOnly {
        return Predecessor::DrainOnly {
            session: Session { conn },
            reason: "asked not to take the listeners (--handover reuseport)".into(),
        };
    }
    match receive_offer(&conn) {
        Ok((pid, received)) => Predecessor::Listeners {
            session: Session { conn },
            inherited: Inherited::new(received),
            pid,
        },
        Err(e) => {
            let reason = crate::telemetry::error_chain(&e);
            if !matches!(e, HandoverError::Refused(_)) {
                // Best effort: the peer learns why, and waits for our Drain.
                let _ = conn.send(Kind::Refuse, reason.as_bytes(), &[], STEP_TIMEOUT);
            }
            Predecessor::DrainOnly {
                session: Session { conn },
                reason,
            }
        }
    }
}

fn connect(path: &Path) -> Result<OwnedFd, HandoverError> {
    let err = |op, source| HandoverError::Socket {
        path: path.to_path_buf(),
        op,
        source,
    };
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| err("socket", e.into()))?;
    let addr = SocketAddrUnix::new(path).map_err(|e| err("name", e.into()))?;
    // A Unix connect waits while the peer's backlog is full, for at most the send timeout.
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Send,
        Some(STEP_TIMEOUT),
    )
    .map_err(|e| err("set a deadline", e.into()))?;
    rustix::net::connect(&fd, &addr).map_err(|e| err("connect", e.into()))?;
    Ok(fd)
}

/// Reads offer frames until `total` descriptions (each with its socket) arrived.
fn receive_offer(conn: &Conn) -> Result<(u32, Vec<(Descriptor, OwnedFd)>), HandoverError> {
    let mut received: Vec<(Descriptor, OwnedFd)> = Vec::new();
    let mut ids = HashSet::new();
    let mut expected: Option<(u32, usize)> = None;
    loop {
        let frame = conn.recv("offer", STEP_TIMEOUT)?;
        if frame.kind == Kind::Refuse {
            return Err(HandoverError::Refused(
                String::from_utf8_lossy(&frame.body).into_owned(),
            ));
        }
        if frame.version != VERSION {
            return Err(HandoverError::Version {
                theirs: frame.version,
            });
        }
        if frame.kind != Kind::Offer {
            return Err(HandoverError::Unexpected {
                got: frame.kind,
                expected: "offer",
            });
        }
        let offer: Offer = body("offer", &frame.body)?;
        let total = offer.total as usize;
        if total > MAX_LISTENERS {
            return Err(HandoverError::Offer(format!(
                "{total} listeners announced, at most {MAX_LISTENERS} accepted"
            )));
        }
        match expected {
            None => expected = Some((offer.pid, total)),
            Some((pid, t)) if pid == offer.pid && t == total => {}
            Some((pid, t)) => {
                return Err(HandoverError::Offer(format!(
                    "a batch says pid {} of {} listeners after pid {pid} of {t}",
                    offer.pid, total
                )))
            }
        }
        if offer.listeners.len() != frame.fds.len() {
            return Err(HandoverError::Offer(format!(
                "{} descriptions came with {} sockets",
                offer.listeners.len(),
                frame.fds.len()
            )));
        }
        for (d, fd) in offer.listeners.into_iter().zip(frame.fds) {
            if d.id as usize >= total || !ids.insert(d.id) {
                return Err(HandoverError::Offer(format!(
                    "listener id {} repeated or out of 0..{total}",
                    d.id
                )));
            }
            received.push((d, fd));
        }
        if received.len() > total {
            return Err(HandoverError::Offer(format!(
                "more than the {total} listeners announced"
            )));
        }
        if received.len() == total {
            return Ok((offer.pid, received));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::pair;
    use super::super::{bind_reuseport, NetnsId, Owner, Role};
    use super::*;

    const NETNS: NetnsId = NetnsId { dev: 4, ino: 7 };

    fn temp_socket(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ambit-handover-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(super::super::SOCKET_NAME)
    }

    #[test]
    fn listeners_travel_to_the_successor_and_done_ends_the_session() {
        let path = temp_socket("ok");
        let registry = Registry::default();
        // More listeners than one frame carries.
        let mut guards = Vec::new();
        let mut listeners = Vec::new();
        for _ in 0..(MAX_FDS + 5) {
            let l = bind_reuseport("127.0.0.1:0".parse().unwrap(), 8).unwrap();
            guards.push(
                registry
                    .register(Owner::Ops { netns: NETNS }, Role::Admin, &l)
                    .unwrap(),
            );
            listeners.push(l);
        }
        let server = Server::bind(&path).unwrap();
        let served = std::thread::spawn(move || server.serve(registry));
        let Predecessor::Listeners {
            session,
            inherited,
            pid,
        } = take_over(&path, Want::Listeners)
        else {
            panic!("no listeners");
        };
        assert_eq!(pid, std::process::id());
        assert_eq!(inherited.remaining(), MAX_FDS + 5);
        let addr = listeners[3].local_addr().unwrap().as_socket().unwrap();
        let l = inherited.take_ops(NETNS, Role::Admin, addr).unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        session.done(inherited.taken()).unwrap();
        let succession = served.join().unwrap();
        assert_eq!(
            succession,
            Succession::HandedOver {
                pid: std::process::id(),
                offered: MAX_FDS + 5,
                adopted: 1
            }
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_forced_fallback_drains_the_old_one_and_no_socket_is_no_predecessor() {
        let path = temp_socket("fallback");
        assert!(matches!(
            take_over(&path, Want::Listeners),
            Predecessor::None { .. }
        ));
        let server = Server::bind(&path).unwrap();
        let served = std::thread::spawn(move || server.serve(Registry::default()));
        let Predecessor::DrainOnly { session, .. } = take_over(&path, Want::DrainOnly) else {
            panic!("expected drain-only");
        };
        session.drain().unwrap();
        assert!(matches!(
            served.join().unwrap(),
            Succession::Replaced { pid: Some(_) }
        ));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn another_version_is_refused_and_still_drains_the_old_one() {
        let (ours, theirs) = pair();
        let old = std::thread::spawn(move || session(ours.into_fd(), &Registry::default()));
        theirs
            .send_as(VERSION + 1, Kind::Hello, b"{}", &[], STEP_TIMEOUT)
            .unwrap();
        let refuse = theirs.recv("refuse", STEP_TIMEOUT).unwrap();
        assert_eq!(refuse.kind, Kind::Refuse);
        assert!(String::from_utf8_lossy(&refuse.body).contains("hand-over version 2"));
        theirs
            .send_as(VERSION + 1, Kind::Drain, b"", &[], STEP_TIMEOUT)
            .unwrap();
        assert!(matches!(
            old.join().unwrap(),
            Ok(Some(Succession::Replaced { pid: None }))
        ));
    }

    #[test]
    fn a_garbled_offer_is_refused_and_closes_what_came_with_it() {
        let (new, old) = pair();
        let l = bind_reuseport("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        // Two descriptions, one socket.
        let offer = br#"{"pid":1,"total":2,"listeners":[
            {"id":0,"owner":{"kind":"ops","netns":{"dev":1,"ino":1}},"role":"admin","addr":"127.0.0.1:1"},
            {"id":1,"owner":{"kind":"ops","netns":{"dev":1,"ino":1}},"role":"admin","addr":"127.0.0.1:2"}]}"#;
        old.send(Kind::Offer, offer, &[l.as_fd()], STEP_TIMEOUT)
            .unwrap();
        let err = receive_offer(&new).unwrap_err();
        assert_eq!(
            err.to_string(),
            "inconsistent offer: 2 descriptions came with 1 sockets"
        );
        old.send(Kind::Offer, b"not json", &[], STEP_TIMEOUT)
            .unwrap();
        let err = receive_offer(&new).unwrap_err();
        assert!(
            matches!(err, HandoverError::Body { what: "offer", .. }),
            "{err}"
        );
        let huge = format!(
            r#"{{"pid":1,"total":{},"listeners":[]}}"#,
            MAX_LISTENERS + 1
        );
        old.send(Kind::Offer, huge.as_bytes(), &[], STEP_TIMEOUT)
            .unwrap();
        assert!(matches!(receive_offer(&new), Err(HandoverError::Offer(_))));
        let dup = br#"{"pid":1,"total":2,"listeners":[
            {"id":0,"owner":{"kind":"ops","netns":{"dev":1,"ino":1}},"role":"admin","addr":"127.0.0.1:1"}]}"#;
        old.send(Kind::Offer, dup, &[l.as_fd()], STEP_TIMEOUT)
            .unwrap();
        old.send(Kind::Offer, dup, &[l.as_fd()], STEP_TIMEOUT)
            .unwrap();
        let err = receive_offer(&new).unwrap_err();
        assert!(err.to_string().contains("listener id 0 repeated"), "{err}");
    }

    #[test]
    fn a_peer_that_says_nothing_is_given_up_on() {
        let (ours, theirs) = pair();
        let started = std::time::Instant::now();
        let err = session(ours.into_fd(), &Registry::default()).unwrap_err();
        assert!(
            matches!(
                err,
                HandoverError::Wire(WireError::Timeout { what: "hello", .. })
            ),
            "{err}"
        );
        assert!(started.elapsed() >= STEP_TIMEOUT - Duration::from_millis(100));
        drop(theirs);
    }
}
