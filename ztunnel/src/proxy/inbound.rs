//! The pod's inbound HBONE proxy (15008): the HBONE server with the pod's certificate, and a
//! handler that decides on each `CONNECT` before the tunnel opens.
//!
//! `accept` (decide): [`decision::inbound`] on a state snapshot (the authority must be this
//! pod and not one of ztunnel's ports, then L4 policy with the peer's authenticated identity)
//! -> refusal with its status; otherwise dial the app *from the client's IP* (IP_TRANSPARENT,
//! inside the pod) -> 503 if that fails. `serve` (do): copy until both sides close, or until
//! a policy change denies the connection (it is in the pod's [`registry`](super::registry)
//! from before the decision). Refusals and failures are logged and counted in `accept`,
//! the rest when `serve` ends.
//!
//! Limits: before its TLS handshake, a TCP connection needs a handshake permit (pod and node)
//! and a node connection permit ([`Handler::admit`]; refused -> reset); each `CONNECT` then
//! needs a permit under the pod's inbound cap and the node's (refused -> 503). Failed
//! handshakes are counted in `ambit_ztunnel_hbone_handshakes_failed_total`.
//!
//! The server takes its TLS config from the pod's [`Credentials`](super::Credentials) on every
//! connection, so a rotated certificate applies to the next handshake without a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ambit_hbone::connect_udp::TunnelProtocol;
use ambit_hbone::server::{
    Admission, ConnectRequest, Handler, Refusal, Server, ServerError, ServerSettings,
};
use ambit_hbone::stream::TunnelStream;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::registry::{Fingerprint, OpenConnection, Registration, Via};
use super::{error_outcome, refused_count, PodProxy, ProxyError, Report, Shared, Timeouts};
use crate::access_log::{Direction, Outcome, Peer, Protocol};
use crate::decision::{self, Inbound};
use crate::drain::DrainWatcher;
use crate::limits::{Activity, ConnectionPermit};
use crate::metrics::{Reporter, ResponseFlags};
use crate::peer::PeerIdentity;

/// Serves HBONE for the pod until drain (then GOAWAY, and the drain deadline for open streams).
pub async fn serve(shared: Shared, pod: Arc<PodProxy>, listener: TcpListener, drain: DrainWatcher) {
    let settings = ServerSettings {
        // The longest drain this pod can get (an upgrade's): the pod's own drain, which waits
        // on this task, aborts it at the deadline it was actually given.
        drain_deadline: shared
            .settings
            .drain_deadline
            .max(shared.settings.upgrade_drain_deadline),
        log_throttle: shared.throttle.clone(),
        ..ServerSettings::default()
    };
    let handler = InboundHandler {
        shared: shared.clone(),
        pod: pod.clone(),
    };
    let server = Server::new(listener, pod.credentials.clone(), handler, settings);
    // The server task holds a watcher for as long as it runs (drain included), so the pod's
    // drain waits for its tunnels.
    let signal = drain.clone();
    server
        .run(async move {
            let _ = signal.signaled().await;
        })
        .await;
    drop(drain);
    tracing::debug!(pod = %pod.name, "HBONE listener closed");
}

/// Decides and serves `CONNECT`s for one pod.
pub struct InboundHandler {
    shared: Shared,
    pod: Arc<PodProxy>,
}

/// The app side of an accepted tunnel.
enum Upstream {
    /// A TCP `CONNECT`: the connection to the app.
    Tcp(TcpStream),
    /// A CONNECT-UDP: a socket connected to the app, bound to the client's IP.
    Udp(UdpSocket),
}

/// What `accept` hands to `serve`.
pub struct Accepted {
    upstream: Upstream,
    report: Report,
    activity: Activity,
    _permit: ConnectionPermit,
    registration: Registration,
}

/// The one place an inbound decision's status becomes a refusal.
fn refusal(status: u16, reason: String) -> Refusal {
    match status {
        401 => Refusal::Unauthenticated(reason),
        403 => Refusal::Forbidden(reason),
        503 => Refusal::Unreachable(reason),
        _ => Refusal::BadRequest(reason),
    }
}

impl Handler for InboundHandler {
    type Accepted = Accepted;

    fn admit(&self, peer: SocketAddr) -> Option<Admission> {
        let (shared, pod) = (&self.shared, &self.pod);
        let admitted = shared.limits.handshake(&pod.limits).and_then(|handshake| {
            // The HBONE connection's own descriptor counts against the node; its streams
            // count against the pod when they open.
            let connection = shared.limits.connection(None)?;
            Ok((handshake, connection))
        });
        match admitted {
            Ok((handshake, connection)) => Some(Admission {
                handshake: Some(Box::new(handshake)),
                connection: Some(Box::new(connection)),
            }),
            Err(why) => {
                refused_count(shared, pod, peer, why);
                None
            }
        }
    }

    fn carries_udp(&self) -> bool {
        true
    }

    fn handshake_failed(&self, error: &ServerError) {
        self.shared.metrics.handshake_failed(error.cause());
    }

    async fn accept(&self, request: &ConnectRequest) -> Result<Accepted, Refusal> {
        let started = Instant::now();
        let activity = Activity::new();
        let (shared, pod) = (&self.shared, &self.pod);
        let permit = match shared.limits.connection(Some(&pod.limits.inbound)) {
            Ok(permit) => permit,
            Err(why) => {
                refused_count(shared, pod, request.peer_addr, why);
                return Err(Refusal::Unreachable(format!(
                    "{} is over its connection limit ({})",
                    pod.name,
                    why.as_str()
                )));
            }
        };
        let client = request.peer_addr;
        // Before the snapshot, so that no policy change can fall between decision and
        // registration (see the registry).
        let registration = pod.inbound.register(OpenConnection {
            client,
            via: Via::Hbone {
                peer: request.peer_identity.clone(),
                authority: request.authority,
            },
        });
        let state = shared.state.snapshot();
        let src = state.workload_by_ip(client.ip()).cloned();
        let dst = state.workload_by_uid(&pod.uid).cloned();
        let report = Report::new(
            Reporter::Destination,
            Peer {
                addr: client,
                // Proven by the peer's certificate in the handshake.
                identity: PeerIdentity::verified(request.peer_identity.clone(), src.as_ref()),
            },
            Peer {
                addr: request.authority,
                identity: PeerIdentity::Verified {
                    identity: pod.identity.clone(),
                    workload: dst.clone(),
                },
            },
            None,
            Direction::Inbound,
            match request.protocol {
                TunnelProtocol::Tcp => Protocol::Hbone,
                TunnelProtocol::Udp => Protocol::ConnectUdp,
            },
            started,
        );
        let report = match request.protocol {
            TunnelProtocol::Tcp => report,
            TunnelProtocol::Udp => report.udp(),
        };
        let Some(dst) = dst else {
            let reason = format!("pod {} is no longer in the state", pod.name);
            report.refused(
                shared,
                ResponseFlags::NoHealthyUpstream,
                Outcome::Refused {
                    reason: reason.clone().into(),
                },
            );
            return Err(Refusal::Unreachable(reason));
        };
        let decided = decision::inbound(
            &state,
            &dst,
            Some(&request.peer_identity),
            client.ip(),
            &request.authority.to_string(),
        );
        registration.decided_on(Fingerprint::of(&state, &dst));
        drop(state);
        let destination = match decided {
            Inbound::Refuse {
                status,
                reason,
                denied_by,
            } => {
                report.refused_inbound(shared, status, &reason, denied_by.as_deref());
                return Err(refusal(status, reason));
            }
            Inbound::Accept {
                destination,
                audit,
                reason,
            } => {
                tracing::debug!(pod = %pod.name, %destination, audit, reason, "inbound allowed");
                destination
            }
        };
        let upstream = match request.protocol {
            TunnelProtocol::Tcp => dial_as_client(shared, pod, client, destination)
                .await
                .map(Upstream::Tcp),
            // The app sees the client's IP; the port is ours (HBONE does not carry the
            // client's), as for TCP.
            TunnelProtocol::Udp => pod
                .capture
                .sockets()
                .transparent_udp(SocketAddr::new(client.ip(), 0), destination)
                .await
                .map(Upstream::Udp)
                .map_err(ProxyError::Socket),
        };
        match upstream {
            Ok(upstream) => Ok(Accepted {
                upstream,
                report,
                activity,
                _permit: permit,
                registration,
            }),
            Err(e) => {
                let outcome = error_outcome(&e);
                report.refused(shared, ResponseFlags::UpstreamConnectionFailure, outcome);
                Err(Refusal::Unreachable(format!(
                    "cannot connect to {destination}"
                )))
            }
        }
    }

    async fn serve(&self, accepted: Accepted, mut stream: TunnelStream) {
        let Accepted {
            upstream,
            report,
            activity,
            _permit,
            registration,
        } = accepted;
        let mut upstream = match upstream {
            Upstream::Tcp(upstream) => upstream,
            Upstream::Udp(socket) => {
                // Boxed: a UDP relay's state is three times a TCP copy's (6.3 KB of this
                // future against 2.1), and inline it would size the task of every inbound
                // TCP connection, idle ones included.
                let relay = self.relay_udp(socket, stream, report, registration);
                Box::pin(relay).await;
                drop(activity);
                return;
            }
        };
        report
            .copy_registered(
                &self.shared.metrics,
                &mut stream,
                &mut upstream,
                activity,
                Timeouts::first_byte(&self.shared),
                registration,
            )
            .await;
    }
}

impl InboundHandler {
    /// Relays one CONNECT-UDP flow until it goes idle, is revoked or the pod drains.
    async fn relay_udp(
        &self,
        socket: UdpSocket,
        stream: TunnelStream,
        report: Report,
        mut registration: Registration,
    ) {
        let metrics = &self.shared.metrics;
        let conn = metrics.connection_opened(&report.labels);
        let mut counts = super::udp::FlowCounts::default();
        let stop = async {
            tokio::select! {
                by = registration.revoked() => super::udp::FlowEnd::Revoked(by),
                _ = self.pod.capture.closed() => super::udp::FlowEnd::Drained,
            }
        };
        let idle = self.shared.limits.limits().udp_idle_timeout;
        let end = super::udp::relay_stream(&socket, stream, None, idle, stop, &mut counts).await;
        super::udp::finish(report, metrics, conn, counts, end, false);
    }
}

/// Connects to the app inside the pod from `client`'s IP, so the app sees the real client.
pub(crate) async fn dial_as_client(
    shared: &Shared,
    pod: &PodProxy,
    client: SocketAddr,
    destination: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    let dial = pod.capture.sockets().connect_from(client.ip(), destination);
    match tokio::time::timeout(shared.settings.connect_timeout, dial).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(ProxyError::Socket(e)),
        Err(_) => Err(ProxyError::Socket(
            crate::capture::sockets::SocketError::Connect {
                dst: destination,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timed out after {:?}", shared.settings.connect_timeout),
                ),
            },
        )),
    }
}
