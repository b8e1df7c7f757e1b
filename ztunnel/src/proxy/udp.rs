//! UDP flows: the pod's captured UDP carried over CONNECT-UDP (RFC 9298), one HBONE stream
//! per flow, in the pod's pooled HBONE connections.
//!
//! A flow is one 5-tuple: (the app's socket, the destination it sent to). Outbound
//! ([`serve_outbound`]): the capture rules TPROXY the app's first datagram of a flow to the
//! pod's UDP capture socket of its family (127.0.0.1:15001/udp or [::1]:15001/udp, one loop
//! each), whose control message names the original destination. The first datagram of an unknown 5-tuple opens a flow (under the pod's flow
//! cap and the node's connection cap, else it is dropped and counted); its task decides
//! ([`decision::outbound_udp`] on a state snapshot), then:
//!
//! - `Hbone`: a CONNECT-UDP stream to the destination's ztunnel, as the pod, and a socket
//!   in the pod *bound to the destination's address* (IP_TRANSPARENT) and connected to the
//!   app: the replies reach the app from the address it sent to, and the flow's next
//!   datagrams reach that socket directly (TPROXY prefers a connected socket);
//! - `Passthrough` (a destination in the captured networks but outside the mesh): the
//!   datagrams go out in plaintext from a marked socket of the pod (the source port changes,
//!   as behind a NAT), and replies come back to the app as above;
//! - `Refuse` / `SelfDial`: the flow's datagrams are dropped until it goes idle, with one
//!   access-log line.
//!
//! Inbound (the HBONE server's handler, `inbound.rs`): the same decision and policy as a
//! TCP `CONNECT` (deny -> 403), then a socket in the destination pod bound to the client's IP
//! (IP_TRANSPARENT) and connected to the app, so the app sees the client's address.
//!
//! Both sides relay until the flow carries nothing either way for the idle timeout
//! (`--udp-idle-timeout-seconds`), the peer closes the stream, a policy change revokes it,
//! or ztunnel drains; then one access-log line with bytes and datagrams each way, and the
//! `istio_tcp_*` series with `request_protocol="udp"`. UDP may lose datagrams, and so may a
//! flow: a datagram that finds the flow's queue full (its tunnel still opening, or its
//! stream stalled) is dropped rather than buffered without bound.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ambit_hbone::capsule::{self, Decoder};
use ambit_hbone::connect_udp::TunnelProtocol;
use ambit_hbone::copy::Transferred;
use ambit_hbone::stream::TunnelStream;
use bytes::{Bytes, BytesMut};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::registry::Revocation;
use super::{error_outcome, open_tunnel, refused_count, PodProxy, ProxyError, Report, Shared};
use crate::access_log::{Direction, Outcome, Peer, Protocol};
use crate::capture::sockets;
use crate::decision::{self, Outbound};
use crate::drain::DrainWatcher;
use crate::limits::{Activity, ConnectionPermit, Refused};
use crate::metrics::{Metrics, Reporter, ResponseFlags};
use crate::peer::PeerIdentity;

/// Datagrams one flow may have queued between the capture socket and its task (while its
/// tunnel opens, or while its stream is slower than the app); more are dropped.
const FLOW_QUEUE: usize = 64;

/// Read buffer of a UDP socket: any datagram fits.
const DATAGRAM_BUFFER: usize = 64 * 1024;

/// What crossed one flow, counted on the way out of ztunnel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowCounts {
    /// Datagrams and payload bytes read from the local socket and sent on.
    pub from_socket: (u64, u64),
    /// Datagrams and payload bytes from the far side delivered to the local socket.
    pub to_socket: (u64, u64),
    /// Datagrams dropped: a full queue, a send the kernel refused.
    pub dropped: u64,
}

/// Why a flow ended.
#[derive(Debug)]
pub(crate) enum FlowEnd {
    /// Nothing either way for the idle timeout.
    Idle,
    /// The far side closed the stream.
    Closed,
    /// A policy change denies the flow now.
    Revoked(Revocation),
    /// ztunnel (or the pod) is draining.
    Drained,
    /// The stream or a socket failed, or the peer sent a malformed capsule stream.
    Failed(String),
}

/// The flows of one pod: (app socket, original destination) -> the flow's queue.
type Flows = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), (u64, mpsc::Sender<Bytes>)>>>;

/// Reads the pod's captured UDP until drain and hands each datagram to its flow.
pub async fn serve_outbound(
    shared: Shared,
    pod: Arc<PodProxy>,
    socket: UdpSocket,
    drain: DrainWatcher,
) {
    let flows: Flows = Arc::default();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; DATAGRAM_BUFFER];
    loop {
        let received = tokio::select! {
            _ = drain.signaled() => break,
            received = socket.async_io(Interest::READABLE, || {
                sockets::recv_original_dst(&socket, &mut buf)
            }) => received,
        };
        let (len, app, dst) = match received {
            Ok((len, app, Some(dst))) => (len, app, dst),
            // Sent to the capture port itself, not TPROXYed: nothing to carry.
            Ok((_, _, None)) => continue,
            Err(e) => {
                super::accept_failed(&shared, &pod, "udp receive", e).await;
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(&buf[..len]);
        let key = (app, dst);
        let queued = {
            let flows = flows.lock().unwrap_or_else(PoisonError::into_inner);
            flows.get(&key).map(|(_, tx)| tx.clone())
        };
        if let Some(tx) = queued {
            match tx.try_send(datagram) {
                Ok(()) => continue,
                // UDP's contract: a datagram the flow cannot take now is lost.
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                // The flow just ended; this datagram opens a new one.
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    open_flow(&shared, &pod, &flows, &mut next_id, key, d, &drain);
                }
            }
        } else {
            open_flow(&shared, &pod, &flows, &mut next_id, key, datagram, &drain);
        }
    }
    tracing::debug!(pod = %pod.name, "UDP capture socket closed");
}

/// Starts a flow for `key` with its first datagram, if the caps allow.
fn open_flow(
    shared: &Shared,
    pod: &Arc<PodProxy>,
    flows: &Flows,
    next_id: &mut u64,
    key: (SocketAddr, SocketAddr),
    first: Bytes,
    drain: &DrainWatcher,
) {
    let permit = match shared.limits.connection(Some(&pod.limits.udp_flows)) {
        Ok(permit) => permit,
        Err(why) => {
            let why = match why {
                Refused::PodConnections => Refused::PodUdpFlows,
                other => other,
            };
            refused_count(shared, pod, key.0, why);
            return;
        }
    };
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    // Room for FLOW_QUEUE datagrams, so the first always fits.
    let _ = tx.try_send(first);
    *next_id += 1;
    let id = *next_id;
    flows
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key, (id, tx));
    let (shared, pod, flows, watcher) = (shared.clone(), pod.clone(), flows.clone(), drain.clone());
    tokio::spawn(async move {
        let stop = watcher.clone();
        let _ = watcher
            .run(outbound_flow(&shared, &pod, key, rx, permit, stop))
            .await;
        let mut flows = flows.lock().unwrap_or_else(PoisonError::into_inner);
        if flows.get(&key).is_some_and(|(flow, _)| *flow == id) {
            flows.remove(&key);
        }
    });
}

/// One outbound flow, from decision to its log line.
async fn outbound_flow(
    shared: &Shared,
    pod: &PodProxy,
    (app, original): (SocketAddr, SocketAddr),
    mut queued: mpsc::Receiver<Bytes>,
    _permit: ConnectionPermit,
    drain: DrainWatcher,
) {
    let started = Instant::now();
    let idle = shared.limits.limits().udp_idle_timeout;
    let state = shared.state.snapshot();
    let source = state.workload_by_uid(&pod.uid).cloned();
    let src = Peer {
        addr: app,
        identity: PeerIdentity::Verified {
            identity: pod.identity.clone(),
            workload: source.clone(),
        },
    };
    let report = |dst: Peer, service, protocol| {
        Report::new(
            Reporter::Source,
            src.clone(),
            dst,
            service,
            Direction::Outbound,
            protocol,
            started,
        )
        .udp()
    };
    let Some(source) = source else {
        report(Peer::from_addr(original), None, Protocol::Udp).refused(
            shared,
            ResponseFlags::NoHealthyUpstream,
            Outcome::Refused {
                reason: format!("pod {} is no longer in the state", pod.name).into(),
            },
        );
        return drop_until_idle(&mut queued, idle).await;
    };
    let decided = decision::outbound_udp(&state, &source, original, &shared.balancer);
    drop(state);
    let stop = async move {
        drain.signaled().await;
        FlowEnd::Drained
    };
    match decided {
        Outbound::Hbone {
            peer,
            authority,
            expected_identity,
            workload,
            service,
        } => {
            let _tracked = shared.balancer.track(workload.uid.clone());
            let dst = Peer {
                addr: authority,
                identity: PeerIdentity::Verified {
                    identity: expected_identity.clone(),
                    workload: Some(workload.clone()),
                },
            };
            let report = report(dst, service.as_deref(), Protocol::ConnectUdp);
            let Some((stream, report)) = open_tunnel(
                shared,
                pod,
                report,
                (peer, authority, expected_identity),
                TunnelProtocol::Udp,
            )
            .await
            else {
                return drop_until_idle(&mut queued, idle).await;
            };
            let socket = match pod.capture.sockets().transparent_udp(original, app).await {
                Ok(socket) => socket,
                Err(e) => {
                    report.refused(
                        shared,
                        ResponseFlags::UpstreamConnectionFailure,
                        error_outcome(&ProxyError::Socket(e)),
                    );
                    return;
                }
            };
            let conn = shared.metrics.connection_opened(&report.labels);
            let mut counts = FlowCounts::default();
            let end =
                relay_stream(&socket, stream, Some(&mut queued), idle, stop, &mut counts).await;
            finish(report, &shared.metrics, conn, counts, end, true);
        }
        Outbound::Passthrough {
            destination,
            reason,
        } => {
            tracing::debug!(pod = %pod.name, %destination, reason, "UDP passthrough");
            let report = report(Peer::from_addr(destination), None, Protocol::Udp);
            let sockets = pod.capture.sockets();
            let opened = async {
                let upstream = sockets.udp(destination).await?;
                let local = sockets.transparent_udp(original, app).await?;
                Ok::<_, crate::capture::sockets::SocketError>((local, upstream))
            };
            let (local, upstream) = match opened.await {
                Ok(sockets) => sockets,
                Err(e) => {
                    report.refused(
                        shared,
                        ResponseFlags::UpstreamConnectionFailure,
                        error_outcome(&ProxyError::Socket(e)),
                    );
                    return;
                }
            };
            let conn = shared.metrics.connection_opened(&report.labels);
            let mut counts = FlowCounts::default();
            let end = relay_sockets(&local, &upstream, &mut queued, idle, stop, &mut counts).await;
            finish(report, &shared.metrics, conn, counts, end, true);
        }
        Outbound::Waypoint { authority, .. } => {
            // Not reached: `outbound_udp` refuses waypoints. Kept total.
            report(Peer::from_addr(authority), None, Protocol::Udp).refused(
                shared,
                ResponseFlags::NoHealthyUpstream,
                Outcome::Refused {
                    reason: "UDP is not carried through waypoints".into(),
                },
            );
            drop_until_idle(&mut queued, idle).await
        }
        Outbound::Blocked {
            destination,
            reason,
        } => {
            shared
                .metrics
                .connection_refused(Refused::RegistryOnly.as_str());
            report(Peer::from_addr(destination), None, Protocol::Udp).refused(
                shared,
                ResponseFlags::Denied,
                Outcome::Refused {
                    reason: reason.into(),
                },
            );
            drop_until_idle(&mut queued, idle).await
        }
        Outbound::External { .. } | Outbound::ExternalDns { .. } => {
            // Not reached: `outbound_udp` maps external services. Kept total.
            report(Peer::from_addr(original), None, Protocol::Udp).refused(
                shared,
                ResponseFlags::NoHealthyUpstream,
                Outcome::Refused {
                    reason: "UDP to this external service is not carried".into(),
                },
            );
            drop_until_idle(&mut queued, idle).await
        }
        Outbound::SelfDial { destination } => {
            refused_count(shared, pod, app, Refused::SelfDial);
            tracing::debug!(pod = %pod.name, %destination, "UDP self-dial dropped");
            drop_until_idle(&mut queued, idle).await
        }
        Outbound::Refuse(reason) => {
            report(Peer::from_addr(original), None, Protocol::Udp).refused(
                shared,
                ResponseFlags::NoHealthyUpstream,
                Outcome::Refused {
                    reason: reason.into(),
                },
            );
            drop_until_idle(&mut queued, idle).await
        }
    }
}

/// A refused flow keeps its place (one refusal, one line, per flow rather than per
/// datagram) and drops what the app sends until it stays quiet for `idle`.
async fn drop_until_idle(queued: &mut mpsc::Receiver<Bytes>, idle: Duration) {
    while let Ok(Some(_)) = tokio::time::timeout(idle, queued.recv()).await {}
}

/// Records a finished flow: bytes into its `istio_tcp_*` series, one access-log line.
/// `outbound`: the local socket is the app's side (its datagrams are "sent"); inbound, the
/// local socket is the destination app and its datagrams are "received".
pub(crate) fn finish(
    report: Report,
    metrics: &Metrics,
    conn: crate::metrics::ConnectionMetrics,
    counts: FlowCounts,
    end: FlowEnd,
    outbound: bool,
) {
    let (towards_destination, from_destination) = if outbound {
        (counts.from_socket, counts.to_socket)
    } else {
        (counts.to_socket, counts.from_socket)
    };
    conn.record_request_bytes(towards_destination.1);
    conn.record_response_bytes(from_destination.1);
    drop(conn);
    let (flags, outcome) = match end {
        FlowEnd::Idle | FlowEnd::Closed | FlowEnd::Drained => (ResponseFlags::None, Outcome::Ok),
        FlowEnd::Revoked(by) => {
            metrics.connection_revoked(&report.labels);
            (
                ResponseFlags::Denied,
                Outcome::Revoked {
                    reason: format!("policy changed: {}: {}", by.status, by.reason),
                },
            )
        }
        FlowEnd::Failed(error) => (ResponseFlags::None, Outcome::Error { error }),
    };
    report.log_datagrams(
        Transferred {
            a_to_b: towards_destination.1,
            b_to_a: from_destination.1,
        },
        Some((towards_destination.0, from_destination.0)),
        flags,
        outcome,
    );
}

/// Whether a UDP socket error ends the flow: an ICMP error reported on a connected socket
/// (the app's port closed, for now) only loses that datagram.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::HostUnreachable
    ) || e.raw_os_error() == Some(nix::libc::EMSGSIZE)
}

/// The next datagram of `queued`, or never once there is none left to wait for.
async fn next_queued(queued: &mut Option<&mut mpsc::Receiver<Bytes>>) -> Bytes {
    match queued {
        Some(q) => match q.recv().await {
            Some(d) => d,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Relays between a local UDP socket (connected to the app) and a CONNECT-UDP stream until
/// the flow ends: datagrams from the socket (and from `queued`, the capture socket's share
/// of the flow) go out as DATAGRAM capsules; capsules from the stream go to the socket.
///
/// The two directions run side by side, so a stream whose send window is full (the peer
/// reads slowly) never stops this side from reading the peer's datagrams: two ztunnels both
/// waiting to write to each other would otherwise wait forever.
pub(crate) async fn relay_stream(
    socket: &UdpSocket,
    stream: TunnelStream,
    mut queued: Option<&mut mpsc::Receiver<Bytes>>,
    idle: Duration,
    stop: impl Future<Output = FlowEnd>,
    counts: &mut FlowCounts,
) -> FlowEnd {
    let (mut rd, mut wr) = tokio::io::split(stream);
    // The two directions share these (atomics only because the futures must be `Send`;
    // they run on one task).
    let activity = Activity::new();
    let [up_n, up_bytes, down_n, down_bytes, down_dropped] =
        std::array::from_fn::<_, 5, _>(|_| AtomicU64::new(0));
    let add = |counter: &AtomicU64, n: u64| counter.fetch_add(n, Relaxed);
    let up = async {
        let mut from_socket = vec![0u8; DATAGRAM_BUFFER];
        let mut out = BytesMut::new();
        let mut dropped = 0u64;
        loop {
            let d: Bytes = tokio::select! {
                got = socket.recv(&mut from_socket) => match got {
                    Ok(n) => Bytes::copy_from_slice(&from_socket[..n]),
                    Err(e) if transient(&e) => {
                        dropped += 1;
                        continue;
                    }
                    Err(e) => return (FlowEnd::Failed(format!("UDP receive: {e}")), dropped),
                },
                d = next_queued(&mut queued) => d,
            };
            activity.touch();
            out.clear();
            capsule::put_datagram(&d, &mut out);
            if let Err(e) = wr.write_all(&out).await {
                return (FlowEnd::Failed(format!("HBONE stream: {e}")), dropped);
            }
            add(&up_n, 1);
            add(&up_bytes, d.len() as u64);
        }
    };
    let down = async {
        let mut decoder = Decoder::new();
        let mut from_stream = vec![0u8; DATAGRAM_BUFFER];
        loop {
            let n = match rd.read(&mut from_stream).await {
                Ok(0) => {
                    return match decoder.finish() {
                        Ok(()) => FlowEnd::Closed,
                        Err(e) => FlowEnd::Failed(e.to_string()),
                    }
                }
                Ok(n) => n,
                Err(e) => return FlowEnd::Failed(format!("HBONE stream: {e}")),
            };
            activity.touch();
            decoder.push(&from_stream[..n]);
            loop {
                let d = match decoder.next_datagram() {
                    Ok(Some(d)) => d,
                    Ok(None) => break,
                    Err(e) => return FlowEnd::Failed(e.to_string()),
                };
                match socket.send(&d).await {
                    Ok(_) => {
                        add(&down_n, 1);
                        add(&down_bytes, d.len() as u64);
                    }
                    Err(e) if transient(&e) => {
                        add(&down_dropped, 1);
                    }
                    Err(e) => return FlowEnd::Failed(format!("UDP send: {e}")),
                }
            }
        }
    };
    let mut up_dropped = 0;
    let end = tokio::select! {
        end = stop => end,
        (end, dropped) = up => {
            up_dropped = dropped;
            end
        }
        end = down => end,
        _ = activity.expired(idle, Some(idle)) => FlowEnd::Idle,
    };
    if matches!(end, FlowEnd::Idle | FlowEnd::Closed | FlowEnd::Drained) {
        // A clean end is END_STREAM both ways, which each side reads as the flow's end:
        // dropping the stream while a direction is open would reset it, and the peer would
        // log a failure. So: END_STREAM, then (unless the peer ended first) wait briefly for
        // the peer's, which it sends when it reads ours; what arrives meanwhile is dropped.
        let closing = async {
            let _ = wr.shutdown().await;
            if !matches!(end, FlowEnd::Closed) {
                let mut sink = [0u8; 4096];
                while let Ok(n) = rd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
    }
    counts.from_socket = (up_n.load(Relaxed), up_bytes.load(Relaxed));
    counts.to_socket = (down_n.load(Relaxed), down_bytes.load(Relaxed));
    counts.dropped += up_dropped + down_dropped.load(Relaxed);
    end
}

/// Relays a passthrough flow between the socket that answers the app (`local`) and the one
/// that reaches the destination in plaintext (`upstream`).
async fn relay_sockets(
    local: &UdpSocket,
    upstream: &UdpSocket,
    queued: &mut mpsc::Receiver<Bytes>,
    idle: Duration,
    stop: impl Future<Output = FlowEnd>,
    counts: &mut FlowCounts,
) -> FlowEnd {
    let mut queued = Some(queued);
    let mut from_local = vec![0u8; DATAGRAM_BUFFER];
    let mut from_upstream = vec![0u8; DATAGRAM_BUFFER];
    tokio::pin!(stop);
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        let up: Option<Bytes> = tokio::select! {
            end = &mut stop => return end,
            () = &mut deadline => return FlowEnd::Idle,
            got = local.recv(&mut from_local) => match got {
                Ok(n) => Some(Bytes::copy_from_slice(&from_local[..n])),
                Err(e) if transient(&e) => { counts.dropped += 1; None }
                Err(e) => return FlowEnd::Failed(format!("UDP receive: {e}")),
            },
            d = next_queued(&mut queued) => Some(d),
            got = upstream.recv(&mut from_upstream) => match got {
                Ok(n) => {
                    match local.send(&from_upstream[..n]).await {
                        Ok(_) => {
                            counts.to_socket.0 += 1;
                            counts.to_socket.1 += n as u64;
                        }
                        Err(e) if transient(&e) => counts.dropped += 1,
                        Err(e) => return FlowEnd::Failed(format!("UDP send: {e}")),
                    }
                    None
                }
                Err(e) if transient(&e) => { counts.dropped += 1; None }
                Err(e) => return FlowEnd::Failed(format!("UDP receive: {e}")),
            },
        };
        if let Some(d) = up {
            match upstream.send(&d).await {
                Ok(_) => {
                    counts.from_socket.0 += 1;
                    counts.from_socket.1 += d.len() as u64;
                }
                Err(e) if transient(&e) => counts.dropped += 1,
                Err(e) => return FlowEnd::Failed(format!("UDP send: {e}")),
            }
        }
        deadline.as_mut().reset(tokio::time::Instant::now() + idle);
    }
}
