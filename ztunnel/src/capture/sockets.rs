//! Sockets for captured traffic: the three listeners ztunnel opens in a pod, and the outbound
//! sockets it dials from inside the pod (marked, so the capture rules let them through).
//!
//! The plain functions here create sockets in the calling thread's network namespace; the
//! [`SocketFactory`] runs them on the pod's namespace worker and hands the result to tokio. A
//! socket stays in the namespace it was created in, so only creation needs the worker: connect,
//! accept and I/O happen on the main runtime.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::netns::{NetnsError, NetnsWorker};

/// Backlog of the capture listeners: bursts of new connections from an app are normal.
const BACKLOG: i32 = 1024;

/// Errors from creating capture sockets.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The socket could not be created or configured in the pod's namespace.
    #[error("cannot create {what} socket in network namespace {netns}")]
    Create {
        /// Which socket (e.g. "outbound", "transparent from 10.77.1.2").
        what: String,
        /// The pod's namespace file.
        netns: String,
        /// The system call that failed.
        #[source]
        source: io::Error,
    },
    /// The pod's namespace worker is gone.
    #[error("cannot reach the namespace worker")]
    Worker(#[source] NetnsError),
    /// The socket could not be registered with the tokio runtime.
    #[error("cannot register a socket with the runtime")]
    Register(#[source] io::Error),
    /// Connecting failed.
    #[error("cannot connect to {dst}")]
    Connect {
        /// Where to.
        dst: SocketAddr,
        /// Why not.
        #[source]
        source: io::Error,
    },
}

fn tcp_socket(family: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(family),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a non-blocking TCP listener at `addr` in the calling thread's namespace.
///
/// `transparent` sets IP_TRANSPARENT, which the inbound TPROXY listener needs so that the kernel
/// hands it connections addressed to other IPs/ports. SO_REUSEADDR lets a re-enrolled pod rebind
/// while old connections linger in TIME_WAIT; SO_REUSEPORT lets a successor ztunnel that could
/// not receive this socket bind beside it during an upgrade (`crate::handover`). An IPv6
/// listener is IPV6_V6ONLY: each family has its own listener, so a `[::]` socket must not also
/// take the IPv4 wildcard's connections (as IPv4-mapped addresses, which TPROXY's IPv4 lookup
/// and the rules do not expect).
pub fn bind_listener(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(addr)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if transparent {
        match addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds the DNS listeners at `addr` (a loopback address; the capture rules REDIRECT port 53
/// there) in the calling thread's namespace: a UDP socket and a TCP listener, non-blocking.
/// SO_REUSEPORT for the same reason as [`bind_listener`]: a successor ztunnel binds beside
/// them during an upgrade (these are not handed over; the old ones close when it drains).
pub fn bind_dns(addr: SocketAddr) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    udp.set_nonblocking(true)?;
    udp.set_reuse_address(true)?;
    udp.set_reuse_port(true)?;
    if addr.is_ipv6() {
        udp.set_only_v6(true)?;
    }
    udp.bind(&addr.into())?;
    Ok((udp.into(), bind_listener(addr, false)?))
}

/// A marked, non-blocking UDP socket for `dst`'s family bound to an ephemeral port, in the
/// calling thread's namespace: ztunnel's own DNS queries to a pod's upstream, which the
/// capture rules must not redirect back to ztunnel.
pub fn marked_udp_socket(dst: SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    socket.set_mark(mark)?;
    let any: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    socket.bind(&any.into())?;
    Ok(socket)
}

/// Binds the UDP capture listener at `addr` (on loopback: the capture rules TPROXY the app's
/// UDP to meshed destinations there) in the calling thread's namespace. IP_TRANSPARENT lets
/// TPROXY hand it datagrams addressed elsewhere; IP_RECVORIGDSTADDR makes each one carry its
/// original destination ([`recv_original_dst`]). SO_REUSEPORT as for [`bind_dns`].
pub fn bind_udp_capture(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    match addr {
        SocketAddr::V4(_) => {
            socket.set_ip_transparent_v4(true)?;
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::Ipv4OrigDstAddr,
                &true,
            )?;
        }
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?;
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::Ipv6OrigDstAddr,
                &true,
            )?;
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// One datagram from a [`bind_udp_capture`] socket: its length, its source (the app's
/// socket) and the destination the app sent it to (`None` if the kernel attached none, i.e.
/// it was not TPROXYed).
pub fn recv_original_dst(
    socket: &impl AsFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    let fd = socket.as_fd();
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(nix::libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let src = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|a| SocketAddr::from((a.ip(), a.port())))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|a| SocketAddr::from((a.ip(), a.port())))
                })
        })
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "datagram without an IP source")
        })?;
    let mut dst = None;
    for cmsg in msg.cmsgs()? {
        match cmsg {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                dst = Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                dst = Some(SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)));
            }
            _ => {}
        }
    }
    Ok((msg.bytes, src, dst))
}

/// A marked UDP socket bound to `local`, which need not be a local address (IP_TRANSPARENT),
/// and connected to `peer`, in the calling thread's namespace. Outbound, it answers the app
/// *as* the destination it sent to (and, being connected, receives the flow's next
/// datagrams, which TPROXY hands to the connected socket before the listener); inbound, it
/// sends to the app *as* the original client. SO_REUSEADDR: several flows share one `local`
/// (many app sockets sending to one destination), told apart by their `peer`.
pub fn transparent_udp_socket(
    local: SocketAddr,
    peer: SocketAddr,
    mark: u32,
) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    socket.set_mark(mark)?;
    socket.set_reuse_address(true)?;
    match local {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?
        }
    }
    socket.bind(&local.into())?;
    socket.connect(&peer.into())?;
    Ok(socket)
}

/// A marked, unbound, non-blocking socket for `dst`'s family, in the calling thread's namespace.
pub fn marked_socket(dst: SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = tcp_socket(dst)?;
    // The capture rules skip packets with this mark; without it the dial would be captured.
    socket.set_mark(mark)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// A marked socket bound to `src` (any port), which need not be a local address: IP_TRANSPARENT
/// lets ztunnel dial the app *as the original client*, so the app and its logs see the real peer.
pub fn transparent_socket(src: IpAddr, mark: u32) -> io::Result<Socket> {
    let bind = SocketAddr::new(src, 0);
    let socket = marked_socket(bind, mark)?;
    match src {
        IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
    }
    socket.bind(&bind.into())?;
    Ok(socket)
}

/// The destination an outbound-captured (REDIRECTed) connection was originally addressed to:
/// SO_ORIGINAL_DST for a connection accepted on an IPv4 listener, IP6T_SO_ORIGINAL_DST on an
/// IPv6 one (each family's conntrack answers only its own option).
pub fn original_dst(stream: &impl AsFd) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = sock.local_addr()?;
    let addr = if local.is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP"))
}

/// Creates ztunnel's outbound sockets inside one pod's namespace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SocketFactory {
    worker: NetnsWorker,
    mark: u32,
}

impl SocketFactory {
    /// A factory for the namespace `worker` lives in, marking sockets with `mark`.
    pub fn new(worker: NetnsWorker, mark: u32) -> Self {
        Self { worker, mark }
    }

    fn netns(&self) -> String {
        self.worker.netns().path().display().to_string()
    }

    /// A marked socket in the pod, unbound: connect it anywhere (HBONE to another node leaves
    /// from the pod's own IP, as with Istio's in-pod mode).
    pub async fn outbound(&self, dst: SocketAddr) -> Result<TcpSocket, SocketError> {
        let mark = self.mark;
        let socket = self
            .worker
            .run(move || marked_socket(dst, mark))
            .await
            .map_err(SocketError::Worker)?
            .map_err(|source| SocketError::Create {
                what: "outbound".into(),
                netns: self.netns(),
                source,
            })?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// [`SocketFactory::outbound`] for synchronous callers (the HBONE pool's socket factory):
    /// blocks the calling thread for one round trip to the namespace worker, which only makes
    /// a socket (tens of microseconds), never waits on the network.
    pub fn outbound_blocking(&self, dst: SocketAddr) -> Result<TcpSocket, SocketError> {
        let mark = self.mark;
        let socket = self
            .worker
            .run_blocking(move || marked_socket(dst, mark))
            .map_err(SocketError::Worker)?
            .map_err(|source| SocketError::Create {
                what: "outbound".into(),
                netns: self.netns(),
                source,
            })?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// A marked IP_TRANSPARENT socket in the pod bound to `src` (the original client's IP).
    pub async fn transparent(&self, src: IpAddr) -> Result<TcpSocket, SocketError> {
        let mark = self.mark;
        let socket = self
            .worker
            .run(move || transparent_socket(src, mark))
            .await
            .map_err(SocketError::Worker)?
            .map_err(|source| SocketError::Create {
                what: format!("transparent from {src}"),
                netns: self.netns(),
                source,
            })?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// A marked UDP socket in the pod, connected to `dst` (only its datagrams are received).
    pub async fn udp(&self, dst: SocketAddr) -> Result<UdpSocket, SocketError> {
        let mark = self.mark;
        let socket = self
            .worker
            .run(move || marked_udp_socket(dst, mark))
            .await
            .map_err(SocketError::Worker)?
            .map_err(|source| SocketError::Create {
                what: "udp".into(),
                netns: self.netns(),
                source,
            })?;
        let socket = UdpSocket::from_std(socket.into()).map_err(SocketError::Register)?;
        socket
            .connect(dst)
            .await
            .map_err(|source| SocketError::Connect { dst, source })?;
        Ok(socket)
    }

    /// A marked IP_TRANSPARENT UDP socket in the pod, bound to `local` and connected to
    /// `peer` ([`transparent_udp_socket`]).
    pub async fn transparent_udp(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<UdpSocket, SocketError> {
        let mark = self.mark;
        let socket = self
            .worker
            .run(move || transparent_udp_socket(local, peer, mark))
            .await
            .map_err(SocketError::Worker)?
            .map_err(|source| SocketError::Create {
                what: format!("udp from {local} to {peer}"),
                netns: self.netns(),
                source,
            })?;
        UdpSocket::from_std(socket.into()).map_err(SocketError::Register)
    }

    /// Connects from inside the pod, past the capture rules.
    pub async fn connect(&self, dst: SocketAddr) -> Result<TcpStream, SocketError> {
        let socket = self.outbound(dst).await?;
        socket
            .connect(dst)
            .await
            .map_err(|source| SocketError::Connect { dst, source })
    }

    /// Connects from inside the pod to `dst` (normally the pod's own app) as if from `src`.
    pub async fn connect_from(
        &self,
        src: IpAddr,
        dst: SocketAddr,
    ) -> Result<TcpStream, SocketError> {
        let socket = self.transparent(src).await?;
        socket
            .connect(dst)
            .await
            .map_err(|source| SocketError::Connect { dst, source })
    }
}

/// Where one family's three capture listeners go in a pod, as (address, transparent):
/// outbound on loopback (REDIRECT from OUTPUT rewrites the destination to 127.0.0.1 or ::1,
/// so loopback suffices and keeps the port unreachable from outside the pod), inbound
/// plaintext on the wildcard with IP_TRANSPARENT (TPROXY), HBONE on the wildcard.
pub fn listener_specs(
    ipv6: bool,
    outbound_port: u16,
    inbound_port: u16,
    hbone_port: u16,
) -> [(SocketAddr, bool); 3] {
    let (lo, any): (IpAddr, IpAddr) = if ipv6 {
        (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::UNSPECIFIED.into())
    } else {
        (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::UNSPECIFIED.into())
    };
    [
        (SocketAddr::new(lo, outbound_port), false),
        (SocketAddr::new(any, inbound_port), true),
        (SocketAddr::new(any, hbone_port), false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listener_and_plain_connection_on_loopback() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        // Not REDIRECTed: the kernel has no original destination to report.
        assert!(original_dst(&server).is_err());
    }

    #[tokio::test]
    async fn ipv6_listeners_take_only_ipv6() {
        // The unspecified IPv6 listener is IPV6_V6ONLY: an IPv4 wildcard on the same port
        // can be bound beside it, and each family's listener gets its own connections.
        let [_, (any6, transparent), _] = listener_specs(true, 0, 0, 0);
        assert!(transparent);
        let v6 = match bind_listener(any6, false) {
            Ok(l) => l,
            // A kernel without IPv6 (ipv6.disable=1) has nothing to test here.
            Err(e) if e.raw_os_error() == Some(97) => return,
            Err(e) => panic!("bind [::]:0: {e}"),
        };
        let port = v6.local_addr().unwrap().port();
        let v4 = bind_listener(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), false)
            .expect("IPv4 wildcard beside an IPv6-only one");
        let (v6, v4) = (
            tokio::net::TcpListener::from_std(v6).unwrap(),
            tokio::net::TcpListener::from_std(v4).unwrap(),
        );
        let _c6 = TcpStream::connect(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port))
            .await
            .unwrap();
        let _c4 = TcpStream::connect(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
            .await
            .unwrap();
        assert!(v6.accept().await.unwrap().1.is_ipv6());
        assert!(v4.accept().await.unwrap().1.is_ipv4());
        assert_eq!(
            listener_specs(true, 15001, 15006, 15008)[0].0,
            "[::1]:15001".parse().unwrap()
        );
    }
}
