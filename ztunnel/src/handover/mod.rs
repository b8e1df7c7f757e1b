//! Zero-reset upgrade: a new ztunnel on the node takes the running one's listening sockets,
//! so no listener ever closes and no connection is reset.
//!
//! - [`Registry`]: every listener this process serves (each pod's 15001/15006/15008, in the
//!   pod's namespace, and the operations ports), described by [`Descriptor`] and held as a
//!   duplicate descriptor for as long as it serves. A pod's entries leave with its capture.
//! - [`Inherited`]: what a successor received; capture and the operations servers take their
//!   listener from it (checked: a listening TCP socket at the described address) instead of
//!   binding one.
//! - [`session`]: the two ends of the hand-over socket (`handover.sock` in the node
//!   directory), over [`wire`] frames.
//!
//! When the hand-over cannot happen (no running ztunnel, a socket error, another protocol
//! version, a garbled peer, or `--handover reuseport`), the successor binds its listeners
//! itself. Every listener carries SO_REUSEPORT, so the two processes' sockets coexist, and the
//! successor tells the old one to drain once it serves: there is never a moment with no
//! listener. ARCHITECTURE.md ("Upgrade") has the whole sequence.

pub mod session;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// File name of the hand-over socket in the node directory.
pub const SOCKET_NAME: &str = "handover.sock";

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A pod's outbound capture (15001).
    Outbound,
    /// A pod's inbound plaintext capture (15006).
    Inbound,
    /// A pod's inbound HBONE (15008).
    Hbone,
    /// Prometheus metrics (15020).
    Metrics,
    /// Readiness (15021).
    Readiness,
    /// Admin (15000).
    Admin,
}

/// Identifies a network namespace: the device and inode of its nsfs file, the same for every
/// path or descriptor that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// Whose listener it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    /// A pod's, bound inside its network namespace.
    Pod { uid: String, netns: NetnsId },
    /// ztunnel's own, in the namespace it runs in. A successor in another namespace (on
    /// Kubernetes each ztunnel pod has its own) binds its own instead: a port in the old pod's
    /// namespace is not one its probes reach.
    Ops { netns: NetnsId },
}

/// One handed-over listener, as the hand-over message describes it. The address carries the
/// family, so IPv6 listeners travel the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Position in the offer, echoed in the successor's `Done`.
    pub id: u32,
    pub owner: Owner,
    pub role: Role,
    /// The bound address (`getsockname`).
    pub addr: SocketAddr,
}

struct Entry {
    owner: Owner,
    role: Role,
    addr: SocketAddr,
    fd: OwnedFd,
}

#[derive(Default)]
struct RegistryInner {
    next: u64,
    entries: BTreeMap<u64, Entry>,
}

/// The listeners this process serves, for a successor. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<RegistryInner>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("listeners", &self.len())
            .finish()
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        // Each update is one insert or remove: a panicking holder cannot leave it half-done.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `listener` (a duplicate of its descriptor is kept) until the returned guard is
    /// dropped. The guard must not outlive the listener's service: the duplicate keeps the
    /// socket open, and a socket nobody accepts on would hold connections in its queue.
    pub fn register(
        &self,
        owner: Owner,
        role: Role,
        listener: &impl AsFd,
    ) -> std::io::Result<Registered> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        let addr = socket2::SockRef::from(&fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("listener has no IP address"))?;
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        inner.entries.insert(
            id,
            Entry {
                owner,
                role,
                addr,
                fd,
            },
        );
        Ok(Registered {
            registry: self.clone(),
            id,
        })
    }

    /// How many listeners are registered.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every registered listener with a fresh duplicate of its descriptor, numbered from 0.
    pub fn snapshot(&self) -> std::io::Result<Vec<(Descriptor, OwnedFd)>> {
        let inner = self.lock();
        let mut out = Vec::with_capacity(inner.entries.len());
        for (n, e) in inner.entries.values().enumerate() {
            let id = u32::try_from(n).map_err(|_| std::io::Error::other("too many listeners"))?;
            out.push((
                Descriptor {
                    id,
                    owner: e.owner.clone(),
                    role: e.role,
                    addr: e.addr,
                },
                e.fd.try_clone()?,
            ));
        }
        Ok(out)
    }
}

/// Keeps one listener in the [`Registry`]; dropping it removes (and closes) the duplicate.
#[must_use = "the listener leaves the registry when this is dropped"]
pub struct Registered {
    registry: Registry,
    id: u64,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered").field("id", &self.id).finish()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().entries.remove(&self.id);
    }
}

/// Why a received descriptor was not used.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// It could not be inspected.
    #[error("cannot inspect the received socket")]
    Inspect(#[source] std::io::Error),
    /// It is not what the description says.
    #[error("the received socket is {found}, not a listening TCP socket at {expected}")]
    Mismatch {
        /// The described address.
        expected: SocketAddr,
        /// What it is.
        found: String,
    },
}

/// Checks that `fd` is a listening TCP socket bound at `addr`.
pub fn check_listener(fd: &OwnedFd, addr: SocketAddr) -> Result<(), AdoptError> {
    let sock = socket2::SockRef::from(fd);
    let ty = sock.r#type().map_err(AdoptError::Inspect)?;
    let listening = sock.is_listener().map_err(AdoptError::Inspect)?;
    let local = sock.local_addr().map_err(AdoptError::Inspect)?.as_socket();
    if ty == socket2::Type::STREAM && listening && local == Some(addr) {
        return Ok(());
    }
    Err(AdoptError::Mismatch {
        expected: addr,
        found: format!(
            "a {ty:?} socket, {}listening, bound at {}",
            if listening { "" } else { "not " },
            local.map_or_else(|| "no IP address".to_string(), |a| a.to_string())
        ),
    })
}

/// A received listener and its socket, `None` once taken.
type Slot = (Descriptor, Option<OwnedFd>);

/// Listeners received from the previous ztunnel, waiting to be taken. Cheap to clone.
#[derive(Clone, Default)]
pub struct Inherited {
    inner: Arc<Mutex<Vec<Slot>>>,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inherited")
            .field("remaining", &self.remaining())
            .finish()
    }
}

/// The network namespace the calling thread is in.
pub fn own_netns() -> std::io::Result<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/thread-self/ns/net")?;
    Ok(NetnsId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

impl Inherited {
    /// Checked listeners (see [`check_listener`]); the others are logged and closed.
    pub fn new(received: Vec<(Descriptor, OwnedFd)>) -> Self {
        let mut kept = Vec::with_capacity(received.len());
        for (d, fd) in received {
            match check_listener(&fd, d.addr) {
                Ok(()) => kept.push((d, Some(fd))),
                Err(e) => tracing::warn!(
                    listener = ?d,
                    error = %crate::telemetry::error_chain(&e),
                    "ignoring a handed-over socket; binding that listener instead"
                ),
            }
        }
        Inherited {
            inner: Arc::new(Mutex::new(kept)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_where(
        &self,
        matches: impl Fn(&Descriptor) -> bool,
    ) -> Option<(Descriptor, std::net::TcpListener)> {
        let mut inner = self.lock();
        let (d, fd) = inner
            .iter_mut()
            .find(|(d, fd)| fd.is_some() && matches(d))?;
        let fd = fd.take()?;
        Some((d.clone(), std::net::TcpListener::from(fd)))
    }

    /// The pod listener for (`uid` in namespace `netns`, `role`, `addr`), if one was handed
    /// over. A pod whose namespace is not the one described (recreated) gets nothing.
    pub fn take_pod(
        &self,
        uid: &str,
        netns: NetnsId,
        role: Role,
        addr: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let want = Owner::Pod {
            uid: uid.to_string(),
            netns,
        };
        self.take_where(|d| d.owner == want && d.role == role && d.addr == addr)
            .map(|(_, l)| l)
    }

    /// The operations listener for `role` configured at `addr` in namespace `netns` (port 0:
    /// any port on that IP, as tests configure).
    pub fn take_ops(
        &self,
        netns: NetnsId,
        role: Role,
        addr: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let want = Owner::Ops { netns };
        self.take_where(|d| {
            d.owner == want
                && d.role == role
                && (d.addr == addr || (addr.port() == 0 && d.addr.ip() == addr.ip()))
        })
        .map(|(_, l)| l)
    }

    /// Ids of the listeners taken so far.
    pub fn taken(&self) -> Vec<u32> {
        self.lock()
            .iter()
            .filter(|(_, fd)| fd.is_none())
            .map(|(d, _)| d.id)
            .collect()
    }

    /// Uids of pods with a listener still waiting.
    pub fn waiting_pods(&self) -> Vec<String> {
        let mut uids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, fd)| fd.is_some())
            .filter_map(|(d, _)| match &d.owner {
                Owner::Pod { uid, .. } => Some(uid.clone()),
                Owner::Ops { .. } => None,
            })
            .collect();
        uids.dedup();
        uids
    }

    /// Listeners not taken yet.
    pub fn remaining(&self) -> usize {
        self.lock().iter().filter(|(_, fd)| fd.is_some()).count()
    }

    /// Closes every listener nobody took (their pods left the mesh meanwhile, or the ports
    /// moved): our copy only; the previous ztunnel closes its own when it drains.
    pub fn release_rest(&self) -> usize {
        let mut inner = self.lock();
        let n = inner.iter().filter(|(_, fd)| fd.is_some()).count();
        inner.clear();
        n
    }
}

/// What capture and the operations servers need: where to register what they serve, and
/// what was inherited. Cheap to clone; the default registers into a registry nobody reads
/// and inherits nothing.
#[derive(Clone, Debug, Default)]
pub struct Handover {
    pub registry: Registry,
    pub inherited: Inherited,
}

/// Binds a non-blocking TCP listener at `addr` in the calling thread's namespace with
/// SO_REUSEADDR (rebinding while old connections linger) and SO_REUSEPORT (a successor that
/// could not receive it binds beside it; see the module docs).
pub fn bind_reuseport(addr: SocketAddr, backlog: i32) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

/// Asks the kernel of the calling thread's namespace to move connections waiting in a
/// closing SO_REUSEPORT listener's queue to another listener of its group (Linux 5.14+),
/// instead of resetting them: the fallback's old listeners close while the new ones serve.
/// Best effort: an older kernel keeps the (short) window in which a queued connection can be
/// reset, and says so in the log.
pub fn migrate_queued_connections() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
        tracing::debug!(error = %e, "cannot set net.ipv4.tcp_migrate_req");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETNS: NetnsId = NetnsId { dev: 4, ino: 7 };

    #[test]
    fn registered_listeners_leave_with_their_guard_and_are_taken_once() {
        let registry = Registry::default();
        let a = bind_reuseport("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let b = bind_reuseport("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let netns = NetnsId { dev: 4, ino: 42 };
        let pod = Owner::Pod {
            uid: "shop/a".into(),
            netns,
        };
        let ga = registry.register(pod.clone(), Role::Hbone, &a).unwrap();
        let gb = registry
            .register(Owner::Ops { netns }, Role::Metrics, &b)
            .unwrap();
        assert_eq!(registry.len(), 2);
        drop(gb);
        let snap = registry.snapshot().unwrap();
        assert_eq!(snap.len(), 1);
        let addr = a.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(snap[0].0.addr, addr);
        drop(ga);
        assert!(registry.is_empty());

        let inherited = Inherited::new(snap);
        assert_eq!(inherited.waiting_pods(), vec!["shop/a".to_string()]);
        // Another namespace (the pod was recreated) or role gets nothing.
        let other = NetnsId { dev: 4, ino: 43 };
        assert!(inherited
            .take_pod("shop/a", other, Role::Hbone, addr)
            .is_none());
        assert!(inherited
            .take_pod("shop/a", netns, Role::Inbound, addr)
            .is_none());
        let got = inherited
            .take_pod("shop/a", netns, Role::Hbone, addr)
            .unwrap();
        assert_eq!(got.local_addr().unwrap(), addr);
        assert!(inherited
            .take_pod("shop/a", netns, Role::Hbone, addr)
            .is_none());
        assert_eq!(inherited.taken(), vec![0]);
        assert_eq!(inherited.remaining(), 0);
    }

    #[test]
    fn a_socket_that_is_not_the_described_listener_is_refused() {
        let l = bind_reuseport("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let fd = OwnedFd::from(std::net::TcpListener::from(l));
        let err = check_listener(&fd, "127.0.0.1:1".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a listening TCP socket at 127.0.0.1:1"),
            "{err}"
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let err = check_listener(&OwnedFd::from(udp), addr).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        let inherited = Inherited::new(vec![(
            Descriptor {
                id: 0,
                owner: Owner::Ops { netns: NETNS },
                role: Role::Admin,
                addr: "127.0.0.1:1".parse().unwrap(),
            },
            fd,
        )]);
        assert_eq!(inherited.remaining(), 0);
    }

    #[test]
    fn ipv6_listeners_are_described_with_their_family() {
        let d = Descriptor {
            id: 5,
            owner: Owner::Pod {
                uid: "shop/a".into(),
                netns: NETNS,
            },
            role: Role::Hbone,
            addr: "[::]:15008".parse().unwrap(),
        };
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains(r#""addr":"[::]:15008""#), "{json}");
        let back: Descriptor = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        // A v6 socket is checked like a v4 one, where the host has IPv6 loopback.
        if let Ok(l) = bind_reuseport("[::1]:0".parse().unwrap(), 8) {
            let addr = l.local_addr().unwrap().as_socket().unwrap();
            let inherited = Inherited::new(vec![(
                Descriptor { addr, ..d.clone() },
                OwnedFd::from(std::net::TcpListener::from(l)),
            )]);
            let got = inherited
                .take_pod("shop/a", NETNS, Role::Hbone, addr)
                .unwrap();
            assert_eq!(got.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn two_reuseport_listeners_share_a_port() {
        let a = bind_reuseport("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let addr = a.local_addr().unwrap().as_socket().unwrap();
        let b = bind_reuseport(addr, 8).unwrap();
        assert_eq!(b.local_addr().unwrap().as_socket(), Some(addr));
        let inherited = Inherited::new(vec![(
            Descriptor {
                id: 3,
                owner: Owner::Ops { netns: NETNS },
                role: Role::Readiness,
                addr,
            },
            OwnedFd::from(std::net::TcpListener::from(b)),
        )]);
        // Another namespace's ops port (another pod's, on Kubernetes) is not ours.
        let other = NetnsId { dev: 1, ino: 2 };
        assert!(inherited
            .take_ops(other, Role::Readiness, "127.0.0.1:0".parse().unwrap())
            .is_none());
        // Tests configure port 0: any port on the same IP matches.
        let l = inherited
            .take_ops(NETNS, Role::Readiness, "127.0.0.1:0".parse().unwrap())
            .unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
    }
}
