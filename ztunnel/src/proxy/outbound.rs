//! The pod's outbound proxy (15001): every TCP connection the app opens arrives here,
//! REDIRECTed by the capture rules, with its original destination in `SO_ORIGINAL_DST`.
//!
//! Phases: original destination -> [`decision::outbound`] on a state snapshot -> do it:
//! - `Passthrough`: plain TCP from inside the pod with a marked socket (so it is not captured
//!   again); the destination sees the pod's own IP.
//! - `Hbone` / `Waypoint`: a `CONNECT` stream on the pod's pool (sockets made in the pod, so
//!   the tunnel leaves from the pod IP), presenting the pod's certificate and requiring the
//!   identity the decision expects.
//! - `External`: a declared ExternalService: plain TCP as for passthrough (to the address
//!   dialled, or a STATIC endpoint), logged with the service's host.
//! - `ExternalDns`: an ExternalService of resolution DNS dialled at its VIP: ztunnel resolves
//!   the host and connects as for `External`.
//! - `Blocked`: the namespace's outbound policy is REGISTRY_ONLY and the destination is
//!   unknown: close, log the reason (flag `RBAC`) and count it
//!   (`ambit_ztunnel_connections_refused{reason="registry_only"}`).
//! - `Refuse`: close the connection and log why.
//! - `SelfDial`: the connection is addressed to one of ztunnel's own listeners in the pod
//!   (e.g. `127.0.0.1:15001`, which is not NATed and so reports itself as its original
//!   destination): reset it, since dialling it would reach this listener again.
//!
//! Before any of this, the connection takes a permit under the pod's outbound cap and the
//! node's (`limits.rs`); over either it is reset at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ambit_hbone::connect_udp::TunnelProtocol;
use ambit_hbone::stream::TunnelStream;
use tokio::net::{TcpListener, TcpStream};

use super::{
    error_outcome, open_tunnel, refuse_new, PodProxy, ProxyError, Report, Shared, Timeouts,
};
use crate::access_log::{Direction, Outcome, Peer, Protocol};
use crate::capture::original_dst;
use crate::decision::{self, ConnectionGuard, Outbound};
use crate::drain::DrainWatcher;
use crate::limits::{Activity, ConnectionPermit, Refused};
use crate::metrics::{Reporter, ResponseFlags};
use crate::peer::PeerIdentity;
use crate::state::{ExternalService, Service, Workload};

/// Accepts the pod's outbound connections until drain.
pub async fn serve(shared: Shared, pod: Arc<PodProxy>, listener: TcpListener, drain: DrainWatcher) {
    loop {
        let accepted = tokio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let permit = match shared.limits.connection(Some(&pod.limits.outbound)) {
                    Ok(permit) => permit,
                    Err(why) => {
                        refuse_new(&shared, &pod, stream, peer, why);
                        continue;
                    }
                };
                let (shared, pod, watcher) = (shared.clone(), pod.clone(), drain.clone());
                tokio::spawn(async move {
                    // Boxed: `run` keeps the future it is given in two places of its own
                    // state (argument and select), so inline it would be counted twice.
                    let work = Box::pin(handle(&shared, &pod, stream, peer, permit));
                    let _ = watcher.run(work).await;
                });
            }
            Err(e) => super::accept_failed(&shared, &pod, "outbound accept", e).await,
        }
    }
    tracing::debug!(pod = %pod.name, "outbound listener closed");
}

/// One captured connection, from decision to close; `_permit` holds its place under the caps.
///
/// Two phases, because a task is as large as its largest state for its whole life: the set-up
/// (decision, certificate, pool, TLS handshake) runs boxed and is freed once the upstream is
/// open, so an idle proxied connection carries only the copy's state (measured with
/// `ztunnel_pods --idle`: the task went from 15 KiB to 3.7 KiB).
async fn handle(
    shared: &Shared,
    pod: &PodProxy,
    app: TcpStream,
    client: SocketAddr,
    _permit: ConnectionPermit,
) {
    let Some(open) = Box::pin(set_up(shared, pod, app, client)).await else {
        return;
    };
    let Established {
        mut app,
        upstream,
        report,
        activity,
        _tracked,
    } = open;
    let timeouts = Timeouts::first_byte(shared);
    match upstream {
        Upstream::Plain(mut upstream) => {
            report
                .copy(&shared.metrics, &mut app, &mut upstream, activity, timeouts)
                .await
        }
        Upstream::Tunnel(mut stream) => {
            report
                .copy(&shared.metrics, &mut app, &mut stream, activity, timeouts)
                .await
        }
    }
}

/// A connection whose upstream is open: what the copy needs, and nothing of the set-up.
struct Established {
    app: TcpStream,
    upstream: Upstream,
    report: Report,
    activity: Activity,
    /// Least-connections counts a tunnel to a chosen workload while it lives.
    _tracked: Option<ConnectionGuard>,
}

enum Upstream {
    /// Passthrough: a plain socket from inside the pod.
    Plain(TcpStream),
    /// An HBONE stream to the destination's node or its waypoint.
    Tunnel(TunnelStream),
}

/// Decides and opens the upstream; `None` when the connection was refused (and reported).
async fn set_up(
    shared: &Shared,
    pod: &PodProxy,
    app: TcpStream,
    client: SocketAddr,
) -> Option<Established> {
    let started = Instant::now();
    let activity = Activity::new();
    let _ = app.set_nodelay(true);
    let state = shared.state.snapshot();
    let source = state.workload_by_uid(&pod.uid).cloned();
    // The source is the pod itself: the capture only hands us connections made inside its
    // namespace, and it is its certificate the tunnel presents.
    let src = PeerIdentity::Verified {
        identity: pod.identity.clone(),
        workload: source.clone(),
    };
    // `expected`: the identity the tunnel's handshake will require of its peer. `w` is the
    // destination the decision chose from the address the app dialled, not a lookup of who
    // answered, so it stays beside the identity even when that is a waypoint's (the final
    // workload's own identity is then never proven here, and never named).
    let base = |dst: SocketAddr,
                w: Option<&std::sync::Arc<Workload>>,
                svc: Option<&Service>,
                protocol: Protocol,
                expected: Option<&ambit_hbone::Identity>| {
        let identity = match expected {
            Some(id) => PeerIdentity::Verified {
                identity: id.clone(),
                workload: w.cloned(),
            },
            None => PeerIdentity::unverified(w),
        };
        Report::new(
            Reporter::Source,
            Peer {
                addr: client,
                identity: src.clone(),
            },
            Peer {
                addr: dst,
                identity,
            },
            svc,
            Direction::Outbound,
            protocol,
            started,
        )
    };
    let original = match original_dst(&app) {
        Ok(dst) => dst,
        Err(e) => {
            let report = base(client, None, None, Protocol::Tcp, None);
            report.refused(
                shared,
                ResponseFlags::NoHealthyUpstream,
                error_outcome(&ProxyError::OriginalDst(e)),
            );
            return None;
        }
    };
    let Some(src_workload) = source.as_deref() else {
        base(original, None, None, Protocol::Tcp, None).refused(
            shared,
            ResponseFlags::NoHealthyUpstream,
            Outcome::Refused {
                reason: format!("pod {} is no longer in the state", pod.name).into(),
            },
        );
        return None;
    };
    let decided = decision::outbound(&state, src_workload, original, &shared.balancer);
    // The snapshot is not needed past the decision; do not pin it for the connection's life.
    drop(state);
    match decided {
        Outbound::Passthrough {
            destination,
            reason,
        } => {
            tracing::debug!(pod = %pod.name, %destination, reason, "passthrough");
            let report = base(destination, None, None, Protocol::Tcp, None);
            direct(shared, pod, app, report, destination, activity).await
        }
        Outbound::External {
            destination,
            service,
        } => {
            tracing::debug!(pod = %pod.name, %destination, service = %service.key(), "external service");
            let mut report = base(destination, None, None, Protocol::Tcp, None);
            if let Some(host) = service.hosts.first() {
                name_by_host(&mut report, host.clone(), &service);
            }
            direct(shared, pod, app, report, destination, activity).await
        }
        Outbound::ExternalDns {
            host,
            port,
            service,
        } => {
            // Resolved by ztunnel (the pod asked the mesh's DNS and got the VIP); the
            // first address answers, as a client library would try.
            let resolved = tokio::time::timeout(
                shared.settings.connect_timeout,
                tokio::net::lookup_host((host.to_string(), port)),
            )
            .await;
            let first = match resolved {
                Ok(Ok(mut addrs)) => addrs.next(),
                _ => None,
            };
            let Some(destination) = first else {
                base(original, None, None, Protocol::Tcp, None).refused(
                    shared,
                    ResponseFlags::NoHealthyUpstream,
                    Outcome::Error {
                        error: format!(
                            "external service {}: {host} did not resolve",
                            service.key()
                        ),
                    },
                );
                return None;
            };
            let mut report = base(destination, None, None, Protocol::Tcp, None);
            name_by_host(&mut report, host, &service);
            direct(shared, pod, app, report, destination, activity).await
        }
        Outbound::Blocked {
            destination,
            reason,
        } => {
            shared
                .metrics
                .connection_refused(Refused::RegistryOnly.as_str());
            base(destination, None, None, Protocol::Tcp, None).refused(
                shared,
                ResponseFlags::Denied,
                Outcome::Refused {
                    reason: reason.into(),
                },
            );
            None
        }
        Outbound::Hbone {
            peer,
            authority,
            expected_identity,
            workload,
            service,
        } => {
            // Least-connections counts this connection while it lives.
            let tracked = shared.balancer.track(workload.uid.clone());
            let report = base(
                authority,
                Some(&workload),
                service.as_deref(),
                Protocol::Hbone,
                Some(&expected_identity),
            );
            let hop = (peer, authority, expected_identity);
            tunnelled(shared, pod, app, report, hop, activity, Some(tracked)).await
        }
        Outbound::Waypoint {
            peer,
            authority,
            expected_identity,
            service,
            workload,
        } => {
            let report = base(
                authority,
                workload.as_ref(),
                service.as_deref(),
                Protocol::Hbone,
                Some(&expected_identity),
            );
            let hop = (peer, authority, expected_identity);
            tunnelled(shared, pod, app, report, hop, activity, None).await
        }
        Outbound::SelfDial { destination } => {
            tracing::debug!(pod = %pod.name, %destination, "self-dial refused");
            super::refused_count(shared, pod, client, Refused::SelfDial);
            ambit_hbone::server::reset(app);
            None
        }
        Outbound::Refuse(reason) => {
            base(original, None, None, Protocol::Tcp, None).refused(
                shared,
                ResponseFlags::NoHealthyUpstream,
                Outcome::Refused {
                    reason: reason.into(),
                },
            );
            None
        }
    }
}

/// Names an external service's connection by `host` in its log line and metrics, as a mesh
/// service is named by its hostname.
fn name_by_host(report: &mut Report, host: Arc<str>, service: &ExternalService) {
    report.service = Some(host.clone());
    report.labels.destination_service = host;
    report.labels.destination_service_namespace = service.namespace.clone();
}

/// An HBONE stream to `peer` (a destination's node or its waypoint), `:authority` and the
/// identity it must present as in `hop`; `tracked` counts it for least-connections.
async fn tunnelled(
    shared: &Shared,
    pod: &PodProxy,
    app: TcpStream,
    report: Report,
    hop: (SocketAddr, SocketAddr, ambit_hbone::Identity),
    activity: Activity,
    tracked: Option<ConnectionGuard>,
) -> Option<Established> {
    let (stream, report) = open_tunnel(shared, pod, report, hop, TunnelProtocol::Tcp).await?;
    Some(Established {
        app,
        upstream: Upstream::Tunnel(stream),
        report,
        activity,
        _tracked: tracked,
    })
}

/// Plain TCP from inside the pod (a marked socket, so it is not captured again) to
/// `destination`; on failure reports it and says `None`.
async fn direct(
    shared: &Shared,
    pod: &PodProxy,
    app: TcpStream,
    report: Report,
    destination: SocketAddr,
    activity: Activity,
) -> Option<Established> {
    let dial = tokio::time::timeout(
        shared.settings.connect_timeout,
        pod.capture.sockets().connect(destination),
    )
    .await;
    match dial {
        Ok(Ok(upstream)) => Some(Established {
            app,
            upstream: Upstream::Plain(upstream),
            report,
            activity,
            _tracked: None,
        }),
        Ok(Err(e)) => {
            report.refused(
                shared,
                ResponseFlags::UpstreamConnectionFailure,
                error_outcome(&ProxyError::Socket(e)),
            );
            None
        }
        Err(_) => {
            report.refused(
                shared,
                ResponseFlags::Timeout,
                Outcome::Error {
                    error: format!(
                        "connect to {destination} timed out after {:?}",
                        shared.settings.connect_timeout
                    ),
                },
            );
            None
        }
    }
}
