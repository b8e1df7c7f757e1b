//! The pod's outbound proxy (15001): every TCP connection the app opens arrives here,
//! REDIRECTed by the capture rules, with its original destination in `SO_ORIGINAL_DST`.
//!
//! Phases: original destination -> [`decision::outbound`] on a state snapshot -> do it:
//! - `Passthrough`: plain TCP from inside the pod with a marked socket (so it is not captured
//!   again); the destination sees the pod's own IP.
//! - `Hbone` / `Waypoint`: a `CONNECT` stream on the pod's pool (sockets made in the pod, so
//!   the tunnel leaves from the pod IP), presenting the pod's certificate and requiring the
//!   identity the decision expects.
//! - `Refuse`: close the connection and log why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ambit_hbone::client::ConnectTarget;
use hyper::HeaderMap;
use tokio::net::{TcpListener, TcpStream};

use super::{error_outcome, labels, peer_of, PodProxy, ProxyError, Report, Shared};
use crate::access_log::{Direction, Outcome, Protocol};
use crate::capture::original_dst;
use crate::decision::{self, Outbound};
use crate::drain::DrainWatcher;
use crate::metrics::{Reporter, ResponseFlags};
use crate::state::{Service, Workload};

/// Accepts the pod's outbound connections until drain.
pub async fn serve(shared: Shared, pod: Arc<PodProxy>, listener: TcpListener, drain: DrainWatcher) {
    loop {
        let accepted = tokio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (shared, pod, watcher) = (shared.clone(), pod.clone(), drain.clone());
                tokio::spawn(async move {
                    let _ = watcher.run(handle(&shared, &pod, stream, peer)).await;
                });
            }
            Err(e) => {
                tracing::warn!(pod = %pod.name, error = %e, "outbound accept failed");
                tokio::time::sleep(super::ACCEPT_BACKOFF).await;
            }
        }
    }
    tracing::debug!(pod = %pod.name, "outbound listener closed");
}

/// One captured connection, from decision to close.
async fn handle(shared: &Shared, pod: &PodProxy, mut app: TcpStream, client: SocketAddr) {
    let started = Instant::now();
    let _ = app.set_nodelay(true);
    let state = shared.state.snapshot();
    let source = state.workload_by_uid(&pod.uid).cloned();
    let base = |dst: SocketAddr,
                w: Option<&Workload>,
                svc: Option<&Service>,
                protocol: Protocol,
                expected: Option<&ambit_hbone::Identity>| Report {
        labels: labels(
            Reporter::Source,
            source.as_deref(),
            None,
            w,
            svc,
            protocol == Protocol::Hbone,
            ResponseFlags::None,
        ),
        src: peer_of(client, source.as_deref(), Some(&pod.identity)),
        dst: peer_of(dst, w, expected),
        service: svc.map(|s| s.hostname.clone()),
        direction: Direction::Outbound,
        protocol,
        started,
    };
    let original = match original_dst(&app) {
        Ok(dst) => dst,
        Err(e) => {
            let report = base(client, None, None, Protocol::Tcp, None);
            report.refused(
                &shared.metrics,
                ResponseFlags::NoHealthyUpstream,
                error_outcome(&ProxyError::OriginalDst(e)),
            );
            return;
        }
    };
    let Some(src_workload) = source.as_deref() else {
        base(original, None, None, Protocol::Tcp, None).refused(
            &shared.metrics,
            ResponseFlags::NoHealthyUpstream,
            Outcome::Refused {
                reason: format!("pod {} is no longer in the state", pod.name).into(),
            },
        );
        return;
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
            let dial = tokio::time::timeout(
                shared.settings.connect_timeout,
                pod.capture.sockets().connect(destination),
            )
            .await;
            match dial {
                Ok(Ok(mut upstream)) => report.copy(&shared.metrics, &mut app, &mut upstream).await,
                Ok(Err(e)) => report.refused(
                    &shared.metrics,
                    ResponseFlags::UpstreamConnectionFailure,
                    error_outcome(&ProxyError::Socket(e)),
                ),
                Err(_) => report.refused(
                    &shared.metrics,
                    ResponseFlags::Timeout,
                    Outcome::Error {
                        error: format!(
                            "connect to {destination} timed out after {:?}",
                            shared.settings.connect_timeout
                        ),
                    },
                ),
            }
        }
        Outbound::Hbone {
            peer,
            authority,
            expected_identity,
            workload,
            service,
        } => {
            // Least-connections counts this connection while it lives.
            let _tracked = shared.balancer.track(workload.uid.clone());
            let report = base(
                authority,
                Some(&workload),
                service.as_deref(),
                Protocol::Hbone,
                Some(&expected_identity),
            );
            tunnel(shared, pod, app, report, peer, authority, expected_identity).await;
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
                workload.as_deref(),
                service.as_deref(),
                Protocol::Hbone,
                Some(&expected_identity),
            );
            tunnel(shared, pod, app, report, peer, authority, expected_identity).await;
        }
        Outbound::Refuse(reason) => {
            base(original, None, None, Protocol::Tcp, None).refused(
                &shared.metrics,
                ResponseFlags::NoHealthyUpstream,
                Outcome::Refused {
                    reason: reason.into(),
                },
            );
        }
    }
}

/// Opens the tunnel as the pod and copies until both sides close.
async fn tunnel(
    shared: &Shared,
    pod: &PodProxy,
    mut app: TcpStream,
    report: Report,
    peer: SocketAddr,
    authority: SocketAddr,
    expected: ambit_hbone::Identity,
) {
    let tls = match pod.credentials.client_config(&expected).await {
        Ok(tls) => tls,
        Err(e) => {
            report.refused(
                &shared.metrics,
                ResponseFlags::UpstreamConnectionFailure,
                error_outcome(&e),
            );
            return;
        }
    };
    let target = ConnectTarget {
        source: pod.identity.clone(),
        tls,
        peer,
        expected_identity: expected,
        authority,
        headers: HeaderMap::new(),
    };
    match pod.pool.connect(target).await {
        Ok(mut stream) => report.copy(&shared.metrics, &mut app, &mut stream).await,
        Err(e) => {
            // 401/403 from the peer is its policy speaking: a refusal, not a failure.
            let (flags, outcome) = match e.status().map(|s| s.as_u16()) {
                Some(401 | 403) => (
                    ResponseFlags::Denied,
                    Outcome::Refused {
                        reason: crate::telemetry::error_chain(&e).into(),
                    },
                ),
                _ => (
                    ResponseFlags::UpstreamConnectionFailure,
                    error_outcome(&ProxyError::Tunnel(e)),
                ),
            };
            report.refused(&shared.metrics, flags, outcome);
        }
    }
}
