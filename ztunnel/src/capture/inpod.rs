//! Enrolling pods: for each one, find its network namespace, open ztunnel's listeners inside it,
//! install the capture rules, and undo all of it when the pod leaves.
//!
//! A [`CapturedPod`] owns one pod's capture: the namespace worker, the listeners (until the
//! proxy takes them), the socket factory and the installed rules. [`CaptureManager`] keys them by
//! pod uid. [`dedicated`] is the same thing for the namespace ztunnel itself runs in (a VM or a
//! machine outside Kubernetes, with one workload beside ztunnel).
//!
//! The rules belong to the pod's enrollment, not to this process. [`CapturedPod::teardown`]
//! (the pod left the mesh) removes them; [`CapturedPod::release`] (ztunnel stops) and `Drop`
//! (ztunnel dies) leave them, so while no ztunnel serves the pod its connections are refused:
//! outbound ones are REDIRECTed to a port nobody listens on (reset), inbound ones TPROXYed to
//! no socket (dropped) or addressed to a closed 15008 (reset). Nothing leaves in plaintext.
//! A starting ztunnel adopts rules it finds ([`iptables::apply`]) after binding its listeners.
//!
//! Order matters on both ends: listeners are opened *before* the rules go in, so a captured
//! connection never meets a closed port once we serve; on teardown the rules go *first*, so new
//! connections flow directly to the app again before the listeners close. The app is never
//! restarted: its listening socket is untouched and connections it already had keep flowing
//! (the rules only capture new connections).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::iptables::{self, IptablesError, Ipv6Capture, RuleConfig};
use super::netns::{self, NetnsError, NetnsHandle, NetnsWorker};
use super::sockets::{self, SocketFactory};
use crate::handover::{Handover, NetnsId, Owner, Registered, Role};

/// Errors from enrolling and removing pods. Each names the pod and its namespace.
#[derive(Debug, thiserror::Error)]
pub enum InpodError {
    /// The pod's network namespace could not be found or entered.
    #[error("pod {uid}: cannot find the network namespace of {ip} under {dir}")]
    Netns {
        /// The pod uid.
        uid: Arc<str>,
        /// The pod IP looked for.
        ip: IpAddr,
        /// The configured namespace directory.
        dir: PathBuf,
        /// What went wrong.
        #[source]
        source: NetnsError,
    },
    /// The pod's namespace worker could not be started or stopped answering.
    #[error("pod {uid}: cannot work inside its network namespace")]
    Worker {
        /// The pod uid.
        uid: Arc<str>,
        /// What went wrong.
        #[source]
        source: NetnsError,
    },
    /// A capture listener could not be opened in the pod.
    #[error("pod {uid}: cannot listen on {addr} in network namespace {netns}")]
    Listen {
        /// The pod uid.
        uid: Arc<str>,
        /// The listen address.
        addr: SocketAddr,
        /// The namespace file.
        netns: PathBuf,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The capture rules could not be installed.
    #[error("pod {uid}: cannot install capture rules in network namespace {netns}")]
    Apply {
        /// The pod uid.
        uid: Arc<str>,
        /// The namespace file.
        netns: PathBuf,
        /// The failing command.
        #[source]
        source: IptablesError,
    },
    /// The capture rules could not be removed (the pod may still be captured).
    #[error("pod {uid}: cannot remove capture rules from network namespace {netns}")]
    Remove {
        /// The pod uid.
        uid: Arc<str>,
        /// The namespace file.
        netns: PathBuf,
        /// The failing command.
        #[source]
        source: IptablesError,
    },
}

/// The three listeners ztunnel serves for one pod, all inside the pod's namespace: the IPv4
/// ones, and the IPv6 ones when the pod's IPv6 is captured.
#[derive(Debug)]
pub struct PodListeners {
    /// 127.0.0.1:15001: the app's outbound connections, REDIRECTed; use
    /// [`sockets::original_dst`] on accepted streams for the real destination.
    pub outbound: TcpListener,
    /// 0.0.0.0:15006, IP_TRANSPARENT: plaintext inbound connections, TPROXYed; an accepted
    /// stream's `local_addr` is the original destination, `peer_addr` the real client.
    pub inbound: TcpListener,
    /// 0.0.0.0:15008: inbound HBONE, addressed to the pod IP directly.
    pub hbone: TcpListener,
    /// The same three for IPv6 (IPV6_V6ONLY sockets), when the pod's IPv6 is captured;
    /// `None` when it is closed.
    pub ipv6: Option<Ipv6Listeners>,
    /// The DNS listeners (UDP and TCP on 127.0.0.1:15053, and [::1]:15053 when the pod's
    /// IPv6 is captured) when DNS is captured; empty otherwise.
    pub dns: Vec<crate::dns::DnsListeners>,
    /// The UDP capture sockets: 127.0.0.1:15001/udp when the rules capture IPv4 UDP
    /// ([`RuleConfig::captures_udp_v4`]), [::1]:15001/udp (IPV6_V6ONLY) when they capture
    /// IPv6 UDP and the pod's IPv6 is captured; IP_TRANSPARENT, each the app's first
    /// datagram of each flow of its family, TPROXYed, read with
    /// [`sockets::recv_original_dst`].
    pub udp: Vec<tokio::net::UdpSocket>,
}

/// A pod's IPv6 capture listeners.
#[derive(Debug)]
pub struct Ipv6Listeners {
    /// [::1]:15001: the app's IPv6 outbound connections, REDIRECTed.
    pub outbound: TcpListener,
    /// [::]:15006, IPV6_TRANSPARENT: IPv6 plaintext inbound, TPROXYed.
    pub inbound: TcpListener,
    /// [::]:15008: inbound HBONE addressed to the pod's IPv6 address.
    pub hbone: TcpListener,
}

impl PodListeners {
    /// Each family's (outbound, inbound, HBONE) listeners, IPv4 first: the proxies serve
    /// every family the same way.
    pub fn by_family(self) -> Vec<[TcpListener; 3]> {
        let mut families = vec![[self.outbound, self.inbound, self.hbone]];
        if let Some(v6) = self.ipv6 {
            families.push([v6.outbound, v6.inbound, v6.hbone]);
        }
        families
    }
}

/// Opens one family's listeners (`specs` from [`sockets::listener_specs`]) in the calling
/// thread's namespace: outbound, inbound, HBONE; each one handed over by the previous ztunnel
/// is used as it is instead.
fn open_or_inherit(
    specs: [(SocketAddr, bool); 3],
    inherited: [Option<std::net::TcpListener>; 3],
) -> Result<[std::net::TcpListener; 3], (SocketAddr, std::io::Error)> {
    let open =
        |(addr, transparent): (SocketAddr, bool), had: Option<std::net::TcpListener>| match had {
            Some(l) => Ok(l),
            None => sockets::bind_listener(addr, transparent).map_err(|e| (addr, e)),
        };
    let [outbound, inbound, hbone] = specs;
    let [o, i, h] = inherited;
    Ok([open(outbound, o)?, open(inbound, i)?, open(hbone, h)?])
}

/// Opens one family's DNS sockets at `port` on loopback, when DNS is captured.
fn open_dns(
    port: Option<u16>,
    ipv6: bool,
) -> Result<Option<(std::net::UdpSocket, std::net::TcpListener)>, (SocketAddr, std::io::Error)> {
    let Some(port) = port else { return Ok(None) };
    let lo: IpAddr = if ipv6 {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let addr = SocketAddr::new(lo, port);
    sockets::bind_dns(addr).map(Some).map_err(|e| (addr, e))
}

/// One pod's capture. See the module docs for the lifecycle.
#[derive(Debug)]
pub struct CapturedPod {
    uid: Arc<str>,
    ip: Option<IpAddr>,
    worker: NetnsWorker,
    rules: RuleConfig,
    /// What `rules.ipv6` was asked to be (it is `Closed` where IPv6 could not be captured).
    ipv6_requested: Ipv6Capture,
    sockets: SocketFactory,
    listeners: Mutex<Option<PodListeners>>,
    /// `true` once torn down; proxy tasks wait on it to stop serving the pod.
    closed: watch::Sender<bool>,
    /// The listeners' entries in the hand-over registry, until the pod stops being served.
    registered: Mutex<Vec<Registered>>,
}

impl CapturedPod {
    /// Captures the namespace `netns` for pod `uid`: starts its worker, opens the listeners,
    /// installs the rules. `ip` is informational (logs, the manager's bookkeeping).
    pub async fn start(
        uid: &str,
        ip: Option<IpAddr>,
        netns: NetnsHandle,
        rules: RuleConfig,
    ) -> Result<Self, InpodError> {
        Self::start_with(uid, ip, netns, rules, &Handover::default()).await
    }

    /// [`CapturedPod::start`] taking the listeners a previous ztunnel handed over, if any,
    /// instead of binding them, and registering them for a successor (`crate::handover`).
    pub async fn start_with(
        uid: &str,
        ip: Option<IpAddr>,
        netns: NetnsHandle,
        rules: RuleConfig,
        handover: &Handover,
    ) -> Result<Self, InpodError> {
        let uid: Arc<str> = Arc::from(uid);
        let path = netns.path().to_path_buf();
        let netns_id = nix::sys::stat::fstat(netns.as_fd())
            .map(|st| NetnsId {
                dev: st.st_dev,
                ino: st.st_ino,
            })
            .map_err(|e| InpodError::Worker {
                uid: uid.clone(),
                source: NetnsError::Open {
                    path: path.clone(),
                    source: e.into(),
                },
            })?;
        let worker = NetnsWorker::spawn(netns).map_err(|source| InpodError::Worker {
            uid: uid.clone(),
            source,
        })?;

        let ipv6_requested = rules.ipv6;
        // A listener handed over by the previous ztunnel is the very socket it served on: no
        // bind, no moment without a listener. Each family's listeners are looked up by role
        // and address; IPv6 ones taken but not used (the pod's IPv6 turns out closed) are
        // simply dropped: the old process still holds its own copies.
        let roles = [Role::Outbound, Role::Inbound, Role::Hbone];
        let specs_v4 = sockets::listener_specs(
            false,
            rules.outbound_port,
            rules.inbound_port,
            rules.hbone_port,
        );
        let specs_v6 = sockets::listener_specs(
            true,
            rules.outbound_port,
            rules.inbound_port,
            rules.hbone_port,
        );
        let inherit = |specs: &[(SocketAddr, bool); 3]| {
            [0, 1, 2].map(|i| {
                handover
                    .inherited
                    .take_pod(&uid, netns_id, roles[i], specs[i].0)
            })
        };
        let (inherited_v4, inherited_v6) = (inherit(&specs_v4), inherit(&specs_v6));
        let handed_over = inherited_v4
            .iter()
            .chain(inherited_v6.iter())
            .filter(|l| l.is_some())
            .count();
        let capture_v6 = rules.ipv6;
        let dns_port = rules.dns_port;
        let udp_capture = rules
            .captures_udp_v4()
            .then(|| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), rules.udp_port));
        let udp_capture_v6 = rules
            .captures_udp_v6()
            .then(|| SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), rules.udp_port));
        let opened = worker
            .run(move || {
                // A successor that could not take these binds beside them (SO_REUSEPORT);
                // when ours then close, waiting connections move to its sockets.
                crate::handover::migrate_queued_connections();
                let v4 = open_or_inherit(specs_v4, inherited_v4)?;
                let dns4 = open_dns(dns_port, false)?;
                let open_udp = |addr: Option<SocketAddr>| {
                    addr.map(|addr| sockets::bind_udp_capture(addr).map_err(|e| (addr, e)))
                        .transpose()
                };
                let udp4 = open_udp(udp_capture)?;
                // A pod's IPv6 is captured only when the kernel has IPv6 and its listeners
                // open; otherwise it is closed by the rules below (never left open).
                let v6 = match capture_v6 {
                    Ipv6Capture::Captured if iptables::ipv6_present() => {
                        let opened = open_or_inherit(specs_v6, inherited_v6).and_then(|l| {
                            Ok((l, open_dns(dns_port, true)?, open_udp(udp_capture_v6)?))
                        });
                        match opened {
                            Ok(v6) => Some(v6),
                            Err((addr, error)) => {
                                tracing::warn!(
                                    %addr, %error,
                                    "cannot listen for IPv6 in the pod; closing its IPv6 instead"
                                );
                                None
                            }
                        }
                    }
                    _ => None,
                };
                Ok::<_, (SocketAddr, std::io::Error)>((v4, (dns4, udp4), v6))
            })
            .await
            .map_err(|source| InpodError::Worker {
                uid: uid.clone(),
                source,
            })?
            .map_err(|(addr, source)| InpodError::Listen {
                uid: uid.clone(),
                addr,
                netns: path.clone(),
                source,
            })?;
        let (opened, (dns4, udp4), opened6) = opened;
        let (opened6, dns6, udp6) = match opened6 {
            Some((l, dns, udp)) => (Some(l), dns, udp),
            None => (None, None, None),
        };
        let mut rules = rules;
        if opened6.is_none() {
            rules.ipv6 = Ipv6Capture::Closed;
        }
        let owner = Owner::Pod {
            uid: uid.to_string(),
            netns: netns_id,
        };
        let mut registered = Vec::with_capacity(6);
        let families = std::iter::once(&opened).chain(opened6.as_ref());
        for family in families {
            for (listener, role) in family.iter().zip(roles) {
                match handover.registry.register(owner.clone(), role, listener) {
                    Ok(r) => registered.push(r),
                    Err(e) => {
                        tracing::warn!(%uid, ?role, error = %e, "listener not registered for a successor")
                    }
                }
            }
        }
        // Registration needs the runtime, so it happens here rather than on the worker.
        // The closure returns the small (addr, io error) pair; the large InpodError is built
        // once, below (clippy::result_large_err).
        let register = |listener: std::net::TcpListener| {
            let addr = listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
            // Handed-over sockets are non-blocking already (the flag is the socket's); bound
            // ones too. Set it anyway: tokio requires it.
            listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
                .map_err(|source| (addr, source))
        };
        let listen_error = |(addr, source)| InpodError::Listen {
            uid: uid.clone(),
            addr,
            netns: path.clone(),
            source,
        };
        let [outbound, inbound, hbone] = opened;
        let (outbound, inbound, hbone) = (
            register(outbound).map_err(listen_error)?,
            register(inbound).map_err(listen_error)?,
            register(hbone).map_err(listen_error)?,
        );
        let ipv6 = match opened6 {
            Some([outbound, inbound, hbone]) => Some(Ipv6Listeners {
                outbound: register(outbound).map_err(listen_error)?,
                inbound: register(inbound).map_err(listen_error)?,
                hbone: register(hbone).map_err(listen_error)?,
            }),
            None => None,
        };
        let mut dns = Vec::with_capacity(2);
        for (udp, tcp) in dns4.into_iter().chain(dns6) {
            let addr = udp
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0));
            let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| listen_error((addr, e)))?;
            dns.push(crate::dns::DnsListeners {
                udp,
                tcp: register(tcp).map_err(listen_error)?,
            });
        }

        let mut udp = Vec::with_capacity(2);
        for socket in udp4.into_iter().chain(udp6) {
            let addr = socket
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0));
            udp.push(tokio::net::UdpSocket::from_std(socket).map_err(|e| listen_error((addr, e)))?);
        }

        let cfg = rules.clone();
        // A failed apply is not cleaned up: restore commits whole or not at all, so rules a
        // previous ztunnel left stay intact (the pod stays refused, never opened), and a lone
        // route or policy rule routes nothing without the marks the rules set.
        let applied = worker
            .run(move || iptables::apply(&cfg))
            .await
            .map_err(|source| InpodError::Worker {
                uid: uid.clone(),
                source,
            })?;
        let adopted = applied.map_err(|source| InpodError::Apply {
            uid: uid.clone(),
            netns: path.clone(),
            source,
        })?;
        tracing::info!(
            %uid,
            ?ip,
            netns = %path.display(),
            adopted,
            ipv6 = ?rules.ipv6,
            listeners_handed_over = handed_over,
            "pod captured"
        );

        Ok(Self {
            sockets: SocketFactory::new(worker.clone(), rules.mark),
            ipv6_requested,
            uid,
            ip,
            worker,
            rules,
            listeners: Mutex::new(Some(PodListeners {
                outbound,
                inbound,
                hbone,
                ipv6,
                dns,
                udp,
            })),
            closed: watch::Sender::new(false),
            registered: Mutex::new(registered),
        })
    }

    /// The pod uid.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The pod IP it was enrolled with, if any.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The pod's namespace.
    pub fn netns(&self) -> &NetnsHandle {
        self.worker.netns()
    }

    /// Whether the namespace file at `path` is another namespace than the one this pod is
    /// captured in (compared by nsfs device and inode, so a namespace recreated under the same
    /// name is another one). `false` when `path` cannot be examined (it is gone).
    pub fn netns_differs(&self, path: &Path) -> bool {
        let Ok(theirs) = nix::sys::stat::stat(path) else {
            return false;
        };
        nix::sys::stat::fstat(self.netns().as_fd())
            .is_ok_and(|ours| (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino))
    }

    /// The rules this pod was captured with (ports, marks, and whether its IPv6 is captured
    /// or closed: closed when it was asked for, or when its IPv6 listeners could not open).
    pub fn rules(&self) -> &RuleConfig {
        &self.rules
    }

    /// Hands the listeners to the proxy (once; later calls get `None`). The proxy stops
    /// accepting when [`CapturedPod::closed`] resolves and then drops them.
    pub fn take_listeners(&self) -> Option<PodListeners> {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Creates ztunnel's marked outbound sockets inside this pod.
    pub fn sockets(&self) -> &SocketFactory {
        &self.sockets
    }

    /// Resolves once the pod has been torn down.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        // The sender lives in `self`, so this only ends by seeing `true`.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Whether the pod has been torn down.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Takes the pod's listeners out of the hand-over registry: a successor must not get a
    /// socket nobody serves any more (our duplicate would also keep it open).
    fn unregister(&self) {
        self.registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Stops serving the pod but leaves its rules (ztunnel is stopping; the pod stays enrolled
    /// and is refused until a ztunnel adopts it): closes the listeners if the proxy never took
    /// them and tells the proxy to stop. Idempotent.
    pub fn release(&self) {
        self.unregister();
        if !self.closed.send_replace(true) {
            drop(self.take_listeners());
            tracing::info!(uid = %self.uid, "pod released; its capture rules stay");
        }
    }

    /// Un-enrolls the pod: removes the rules, closes the listeners if the proxy never took them,
    /// and tells the proxy to stop. Idempotent. On error the pod is still marked closed (the
    /// proxy stops), but rules may remain in the namespace: the error says which.
    pub async fn teardown(&self) -> Result<(), InpodError> {
        self.unregister();
        if self.closed.send_replace(true) {
            return Ok(());
        }
        let cfg = self.rules.clone();
        let removed = self.worker.run(move || iptables::remove(&cfg)).await;
        drop(self.take_listeners());
        tracing::info!(uid = %self.uid, "pod capture removed");
        removed
            .map_err(|source| InpodError::Worker {
                uid: self.uid.clone(),
                source,
            })?
            .map_err(|source| InpodError::Remove {
                uid: self.uid.clone(),
                netns: self.netns().path().to_path_buf(),
                source,
            })
    }
}

impl Drop for CapturedPod {
    fn drop(&mut self) {
        // Dropped without `teardown()` (ztunnel exiting, a task aborted): the pod is still
        // enrolled, so its rules stay and it is refused until a ztunnel adopts it. Only the
        // proxy is told to stop.
        self.closed.send_replace(true);
    }
}

/// Where to find pods and how to capture them.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Directory of network namespace files (what `ip netns add` uses, or the CNI's).
    pub netns_dir: PathBuf,
    /// Ports, marks and backend of the rules.
    pub rules: RuleConfig,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            netns_dir: PathBuf::from("/var/run/netns"),
            rules: RuleConfig::default(),
        }
    }
}

/// The captured pods of this node, by uid.
#[derive(Debug)]
pub struct CaptureManager {
    cfg: CaptureConfig,
    /// Listeners inherited from, and registered for, the ztunnels before and after this one.
    handover: Handover,
    /// Where the CNI plugin said pods are (`crate::cni`): used before scanning by IP.
    hints: crate::cni::Hints,
    /// An async lock: enroll/remove of the same uid must not interleave across awaits.
    pods: tokio::sync::Mutex<HashMap<Arc<str>, Arc<CapturedPod>>>,
}

impl CaptureManager {
    /// A manager with no pods yet.
    pub fn new(cfg: CaptureConfig) -> Self {
        Self::with_handover(cfg, Handover::default())
    }

    /// A manager whose pods take their listeners from `handover` when it has them, and
    /// register them there.
    pub fn with_handover(cfg: CaptureConfig, handover: Handover) -> Self {
        Self {
            cfg,
            handover,
            hints: crate::cni::Hints::default(),
            pods: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The pods the CNI plugin reported (the `cni.sock` endpoint writes them).
    pub fn hints(&self) -> &crate::cni::Hints {
        &self.hints
    }

    /// The configuration.
    pub fn config(&self) -> &CaptureConfig {
        &self.cfg
    }

    /// Captures the pod `uid` whose namespace carries `ip`, its IPv6 as configured. Enrolling
    /// an enrolled pod again returns the existing capture; a changed IP re-captures it.
    pub async fn enroll(&self, ip: IpAddr, uid: &str) -> Result<Arc<CapturedPod>, InpodError> {
        self.enroll_with(ip, uid, self.cfg.rules.ipv6).await
    }

    /// [`CaptureManager::enroll`], with the pod's IPv6 captured or closed as `ipv6` says
    /// (closed when the mesh knows no IPv6 address of the pod). A change of `ipv6`
    /// re-captures the pod.
    pub async fn enroll_with(
        &self,
        ip: IpAddr,
        uid: &str,
        ipv6: Ipv6Capture,
    ) -> Result<Arc<CapturedPod>, InpodError> {
        let mut pods = self.pods.lock().await;
        if let Some(existing) = pods.get(uid) {
            if existing.ip() == Some(ip) && existing.ipv6_requested == ipv6 && !existing.is_closed()
            {
                return Ok(existing.clone());
            }
            if let Some(old) = pods.remove(uid) {
                if let Err(err) = old.teardown().await {
                    tracing::warn!(error = %err, "re-enroll: tearing down the old capture failed");
                }
            }
        }
        let dir = self.cfg.netns_dir.clone();
        let find_dir = dir.clone();
        // The CNI named the pod's namespace: no scan (and it need not be under `netns_dir`).
        let hinted = self
            .hints
            .find(uid, Some(ip))
            .filter(|h| h.ips.is_empty() || h.ips.contains(&ip))
            .and_then(|h| {
                NetnsHandle::open(&h.netns)
                    .inspect_err(
                        |e| tracing::debug!(uid, error = %e, "CNI hint unusable; scanning"),
                    )
                    .ok()
            });
        // The scan enters every namespace in turn and takes milliseconds each: off the runtime.
        let found = match hinted {
            Some(handle) => Ok(handle),
            None => tokio::task::spawn_blocking(move || netns::find_by_ip(&find_dir, ip))
                .await
                .unwrap_or_else(|_| Err(NetnsError::WorkerGone { path: dir.clone() })),
        };
        let handle = found.map_err(|source| InpodError::Netns {
            uid: Arc::from(uid),
            ip,
            dir,
            source,
        })?;
        let rules = RuleConfig {
            ipv6,
            ..self.cfg.rules.clone()
        };
        let pod =
            Arc::new(CapturedPod::start_with(uid, Some(ip), handle, rules, &self.handover).await?);
        pods.insert(pod.uid.clone(), pod.clone());
        Ok(pod)
    }

    /// Un-captures pod `uid` (it left the mesh): its rules are removed. Returns whether it was
    /// enrolled.
    pub async fn remove(&self, uid: &str) -> Result<bool, InpodError> {
        let pod = self.pods.lock().await.remove(uid);
        match pod {
            Some(pod) => pod.teardown().await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Stops serving pod `uid` but leaves its rules (ztunnel is stopping, the pod is still
    /// enrolled). Returns whether it was enrolled.
    pub async fn release(&self, uid: &str) -> bool {
        let pod = self.pods.lock().await.remove(uid);
        pod.inspect(|p| p.release()).is_some()
    }

    /// Removes the rules of a pod this ztunnel never served (its enrollment kept failing, e.g.
    /// rules left by an earlier ztunnel) that left the mesh: finds its namespace by `ip` and
    /// removes our rules there. A namespace that is gone took its rules along: `Ok(false)`.
    pub async fn remove_unserved(&self, uid: &str, ip: IpAddr) -> Result<bool, InpodError> {
        if self.remove(uid).await? {
            return Ok(true);
        }
        let dir = self.cfg.netns_dir.clone();
        let find_dir = dir.clone();
        let found = tokio::task::spawn_blocking(move || netns::find_by_ip(&find_dir, ip))
            .await
            .unwrap_or_else(|_| Err(NetnsError::WorkerGone { path: dir.clone() }));
        let handle = match found {
            Ok(h) => h,
            Err(NetnsError::NotFound { .. }) => return Ok(false),
            Err(source) => {
                return Err(InpodError::Netns {
                    uid: Arc::from(uid),
                    ip,
                    dir,
                    source,
                })
            }
        };
        let netns = handle.path().to_path_buf();
        let worker = NetnsWorker::spawn(handle).map_err(|source| InpodError::Worker {
            uid: Arc::from(uid),
            source,
        })?;
        let cfg = self.cfg.rules.clone();
        worker
            .run(move || iptables::remove(&cfg))
            .await
            .map_err(|source| InpodError::Worker {
                uid: Arc::from(uid),
                source,
            })?
            .map_err(|source| InpodError::Remove {
                uid: Arc::from(uid),
                netns,
                source,
            })?;
        Ok(true)
    }

    /// Removes our rules from namespace `netns`, which belongs to pod `uid` that left the mesh
    /// while no ztunnel served it (`super::sweep`). Holds the pods' lock throughout and asks
    /// `still_orphaned` (on the current state) under it, so enrollment never captures the pod
    /// while its rules go: a pod enrolled meanwhile, or served here, is left alone. Returns
    /// whether rules were removed (`false`: none of ours there, or no longer orphaned).
    pub async fn remove_orphaned(
        &self,
        uid: &str,
        netns: NetnsHandle,
        still_orphaned: impl FnOnce() -> bool,
    ) -> Result<bool, InpodError> {
        let pods = self.pods.lock().await;
        if pods.contains_key(uid) || !still_orphaned() {
            return Ok(false);
        }
        let path = netns.path().to_path_buf();
        let worker = NetnsWorker::spawn(netns).map_err(|source| InpodError::Worker {
            uid: Arc::from(uid),
            source,
        })?;
        let cfg = self.cfg.rules.clone();
        let removed = worker
            .run(move || {
                // Only a namespace holding rules of ours is touched (not even our routing table).
                if iptables::parse_save(&iptables::save(cfg.backend)?).is_empty() {
                    return Ok(false);
                }
                iptables::remove(&cfg).map(|()| true)
            })
            .await
            .map_err(|source| InpodError::Worker {
                uid: Arc::from(uid),
                source,
            })?
            .map_err(|source| InpodError::Remove {
                uid: Arc::from(uid),
                netns: path,
                source,
            })?;
        drop(pods);
        Ok(removed)
    }

    /// The capture of pod `uid`, if enrolled.
    pub async fn get(&self, uid: &str) -> Option<Arc<CapturedPod>> {
        self.pods.lock().await.get(uid).cloned()
    }

    /// The uids of every enrolled pod.
    pub async fn uids(&self) -> Vec<Arc<str>> {
        self.pods.lock().await.keys().cloned().collect()
    }
}

/// Dedicated mode: captures the namespace the calling thread is in (ztunnel running beside one
/// workload, on a VM or a machine outside Kubernetes) with the same rules and listeners.
///
/// ztunnel's own outbound connections there (to the controller, to peers) must use
/// [`CapturedPod::sockets`] or be listed in `rules.outbound_exclude_ports`, and its admin,
/// metrics and readiness ports (and e.g. ssh) in `rules.inbound_exclude_ports`: every other TCP
/// connection in the namespace is captured. [`RuleConfig::dedicated`] has those exclusions.
pub async fn dedicated(uid: &str, rules: RuleConfig) -> Result<CapturedPod, InpodError> {
    dedicated_with(uid, rules, &Handover::default()).await
}

/// [`dedicated`] with listeners inherited from, and registered for, other ztunnels.
pub async fn dedicated_with(
    uid: &str,
    rules: RuleConfig,
    handover: &Handover,
) -> Result<CapturedPod, InpodError> {
    let handle = NetnsHandle::current().map_err(|source| InpodError::Worker {
        uid: Arc::from(uid),
        source,
    })?;
    CapturedPod::start_with(uid, None, handle, rules, handover).await
}
