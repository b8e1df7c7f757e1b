//! The hand-over socket's framing: one `SOCK_SEQPACKET` record per frame, so a frame and the
//! descriptors attached to it (SCM_RIGHTS) arrive together or not at all.
//!
//! ```text
//! 0      4        6      7          8         12
//! | AMBH | version | kind | reserved | length | body (length bytes, at most MAX_BODY)
//! ```
//!
//! Integers are big-endian. The header layout, and the `Refuse` (body: a UTF-8 reason) and
//! `Drain` (empty body) frames, are frozen: every version of ztunnel reads them, so two
//! versions that cannot hand over can still agree that the old one drains. The other bodies
//! are JSON and belong to their version.
//!
//! Everything from the peer is bounded: a record larger than the receive buffer, more
//! descriptors than [`MAX_FDS`], a length that does not match the record, an unknown kind or
//! magic are errors naming what was wrong, and descriptors that came with a bad record are
//! closed (they are [`OwnedFd`]s from the moment they arrive). Every receive has a deadline.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::sockopt::Timeout;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"AMBH";
/// The protocol version this ztunnel speaks.
pub const VERSION: u16 = 1;
/// Header length.
pub const HEADER: usize = 12;
/// Largest body accepted (a batch of descriptors is a few KiB of JSON).
pub const MAX_BODY: usize = 60 * 1024;
/// Most descriptors attached to one frame (the kernel's own cap is 253).
pub const MAX_FDS: usize = 32;

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Successor -> running: who it is and what it wants.
    Hello,
    /// Running -> successor: a batch of listener descriptions, their sockets attached.
    Offer,
    /// Successor -> running: serving on the handed listeners; stop accepting and drain.
    Done,
    /// Either way: cannot go on (frozen: a UTF-8 reason).
    Refuse,
    /// Successor -> running: serving on its own listeners; stop accepting and drain (frozen:
    /// empty).
    Drain,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::Offer => 2,
            Kind::Done => 3,
            Kind::Refuse => 4,
            Kind::Drain => 5,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::Offer,
            3 => Kind::Done,
            4 => Kind::Refuse,
            5 => Kind::Drain,
            _ => return None,
        })
    }
}

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A system call on the hand-over socket failed.
    #[error("hand-over socket: {op} failed")]
    Io {
        /// Which call.
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The peer said nothing within the deadline.
    #[error("hand-over socket: no {what} from the peer within {after:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The peer closed the connection.
    #[error("hand-over socket: the peer closed the connection")]
    Closed,
    /// A record too short to hold the header.
    #[error("hand-over frame of {len} bytes is shorter than its {HEADER}-byte header")]
    Short {
        /// Bytes received.
        len: usize,
    },
    /// Not our protocol.
    #[error("hand-over frame starts with {found:02x?}, not {MAGIC:02x?}")]
    Magic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The record or its descriptors did not fit what we accept.
    #[error("hand-over frame truncated: larger than {MAX_BODY} bytes or more than {MAX_FDS} descriptors")]
    Truncated,
    /// The declared length is not the record's.
    #[error("hand-over frame declares {declared} body bytes but carries {carried}")]
    Length {
        /// The header's length field.
        declared: usize,
        /// Bytes actually after the header.
        carried: usize,
    },
    /// A kind this version does not know.
    #[error("hand-over frame of unknown kind {0}")]
    UnknownKind(u8),
    /// A body too large to send.
    #[error("hand-over frame body of {0} bytes is over the {MAX_BODY}-byte limit")]
    TooLarge(usize),
    /// More descriptors than a frame may carry.
    #[error("{0} descriptors in one hand-over frame (at most {MAX_FDS})")]
    TooManyFds(usize),
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    /// The sender's protocol version.
    pub version: u16,
    pub kind: Kind,
    pub body: Vec<u8>,
    /// Descriptors that came with it (closed when dropped).
    pub fds: Vec<OwnedFd>,
}

/// The header of a frame of `kind` with a body of `len` bytes.
pub fn header(version: u16, kind: Kind, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&version.to_be_bytes());
    h[6] = kind.code();
    // The length is checked against MAX_BODY before any header is built.
    h[8..12].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// Parses one record (header and body); `fds` are the descriptors that came with it.
pub fn parse(record: &[u8], fds: Vec<OwnedFd>) -> Result<Frame, WireError> {
    if record.len() < HEADER {
        return Err(WireError::Short { len: record.len() });
    }
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&record[..4]);
    if magic != MAGIC {
        return Err(WireError::Magic { found: magic });
    }
    let version = u16::from_be_bytes([record[4], record[5]]);
    let kind = Kind::from_code(record[6]).ok_or(WireError::UnknownKind(record[6]))?;
    let declared = u32::from_be_bytes([record[8], record[9], record[10], record[11]]) as usize;
    let carried = record.len() - HEADER;
    if declared != carried {
        return Err(WireError::Length { declared, carried });
    }
    if fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds(fds.len()));
    }
    Ok(Frame {
        version,
        kind,
        body: record[HEADER..].to_vec(),
        fds,
    })
}

/// One end of a hand-over connection: a blocking `SOCK_SEQPACKET` Unix socket whose every
/// send and receive has its own deadline (SO_SNDTIMEO / SO_RCVTIMEO). The exchange is a few
/// frames, so it runs on a blocking thread rather than the runtime.
#[derive(Debug)]
pub struct Conn {
    fd: OwnedFd,
}

impl Conn {
    /// Wraps a connected socket.
    pub fn new(fd: OwnedFd) -> Self {
        Conn { fd }
    }

    /// Gives the socket back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The socket (for peer credentials).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn deadline(&self, which: Timeout, after: Duration) -> Result<(), WireError> {
        // A zero timeout means "forever" to the kernel: never ask for one.
        let after = after.max(Duration::from_millis(1));
        rustix::net::sockopt::set_socket_timeout(&self.fd, which, Some(after)).map_err(|e| {
            WireError::Io {
                op: "set a deadline",
                source: e.into(),
            }
        })
    }

    /// Sends one frame of this version with `fds` attached, within `timeout`.
    pub fn send(
        &self,
        kind: Kind,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<(), WireError> {
        self.send_as(VERSION, kind, body, fds, timeout)
    }

    /// [`Conn::send`] with an explicit version (the frozen frames, and tests).
    pub fn send_as(
        &self,
        version: u16,
        kind: Kind,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<(), WireError> {
        if body.len() > MAX_BODY {
            return Err(WireError::TooLarge(body.len()));
        }
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds(fds.len()));
        }
        self.deadline(Timeout::Send, timeout)?;
        let head = header(version, kind, body.len());
        let total = HEADER + body.len();
        let iov = [IoSlice::new(&head), IoSlice::new(body)];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(WireError::TooManyFds(fds.len()));
        }
        match sendmsg(&self.fd, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) if n == total => Ok(()),
            Ok(n) => Err(WireError::Io {
                op: "sendmsg",
                source: std::io::Error::other(format!("sent {n} of {total} bytes of one record")),
            }),
            Err(e) if e == rustix::io::Errno::AGAIN => Err(WireError::Timeout {
                what: "room to send",
                after: timeout,
            }),
            Err(e) => Err(WireError::Io {
                op: "sendmsg",
                source: e.into(),
            }),
        }
    }

    /// Receives one frame within `timeout`; `what` names it in the timeout error.
    pub fn recv(&self, what: &'static str, timeout: Duration) -> Result<Frame, WireError> {
        self.deadline(Timeout::Recv, timeout)?;
        // One byte more than the largest frame, so an oversized one shows as TRUNC.
        let mut buf = vec![0u8; HEADER + MAX_BODY + 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = loop {
            match recvmsg(
                &self.fd,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(msg) => break msg,
                Err(e) if e == rustix::io::Errno::INTR => continue,
                Err(e) if e == rustix::io::Errno::AGAIN => {
                    return Err(WireError::Timeout {
                        what,
                        after: timeout,
                    })
                }
                Err(e) => {
                    return Err(WireError::Io {
                        op: "recvmsg",
                        source: e.into(),
                    })
                }
            }
        };
        // Take ownership of every descriptor first, so none leaks whatever follows.
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        {
            return Err(WireError::Truncated);
        }
        buf.truncate(msg.bytes.min(buf.len()));
        if buf.is_empty() && fds.is_empty() {
            return Err(WireError::Closed);
        }
        parse(&buf, fds)
    }
}

/// A connected pair of hand-over sockets (tests).
#[cfg(test)]
pub fn pair() -> (Conn, Conn) {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (a, b) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    (Conn::new(a), Conn::new(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn a_frame_and_its_descriptors_arrive_together() {
        let (a, b) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        a.send(Kind::Offer, b"{\"x\":1}", &[listener.as_fd()], T)
            .unwrap();
        let frame = b.recv("offer", T).unwrap();
        assert_eq!(frame.kind, Kind::Offer);
        assert_eq!(frame.version, VERSION);
        assert_eq!(frame.body, b"{\"x\":1}");
        assert_eq!(frame.fds.len(), 1);
        // The same socket: it reports the same address.
        let got = std::net::TcpListener::from(frame.fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
    }

    #[test]
    fn garbage_is_refused_with_what_was_wrong() {
        assert!(matches!(
            parse(b"AMB", vec![]),
            Err(WireError::Short { len: 3 })
        ));
        let mut bad = header(1, Kind::Hello, 0).to_vec();
        bad[0] = b'X';
        assert!(matches!(parse(&bad, vec![]), Err(WireError::Magic { .. })));
        let mut long = header(1, Kind::Hello, 10).to_vec();
        long.extend_from_slice(b"abc");
        let err = parse(&long, vec![]).unwrap_err();
        assert!(matches!(
            err,
            WireError::Length {
                declared: 10,
                carried: 3
            }
        ));
        assert_eq!(
            err.to_string(),
            "hand-over frame declares 10 body bytes but carries 3"
        );
        let mut kind = header(1, Kind::Hello, 0);
        kind[6] = 99;
        assert!(matches!(
            parse(&kind, vec![]),
            Err(WireError::UnknownKind(99))
        ));
    }

    #[test]
    fn oversized_records_and_silence_are_errors() {
        let (a, b) = pair();
        // A hostile peer writes one huge record straight to the socket.
        let huge = vec![b'A'; HEADER + MAX_BODY + 100];
        rustix::net::send(&a.fd, &huge, SendFlags::empty()).unwrap();
        assert!(matches!(b.recv("x", T), Err(WireError::Truncated)));
        assert!(matches!(
            a.send(Kind::Hello, &huge, &[], T),
            Err(WireError::TooLarge(_))
        ));
        let started = std::time::Instant::now();
        let err = b.recv("hello", Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(err, WireError::Timeout { what: "hello", .. }),
            "{err}"
        );
        assert!(started.elapsed() >= Duration::from_millis(40));
        drop(a);
        assert!(matches!(b.recv("x", T), Err(WireError::Closed)));
    }
}
