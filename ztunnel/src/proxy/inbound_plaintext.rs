//! The pod's inbound plaintext proxy (15006): TCP from clients outside the mesh, TPROXYed
//! by the capture rules. The accepted socket's local address is the original destination
//! and its peer the real client.
//!
//! [`decision::inbound_plaintext`] refuses a port whose mTLS mode is STRICT (PeerAuthentication,
//! else `--strict-inbound`) and applies policy without a source identity otherwise; an allowed connection is dialled to the app from the client's
//! IP, like HBONE inbound, and copied until it ends or a policy change denies it (it is in
//! the pod's [`registry`](super::registry)). A refusal closes the connection: plain TCP has
//! no status to send.
//!
//! Limits: a permit under the pod's inbound cap and the node's is taken at accept (over
//! either: reset); a served connection is closed when no byte has moved either way within
//! the first-byte timeout, or for the plaintext idle timeout (the peer is unauthenticated, so
//! it must not hold descriptors for free).
//!
//! Nothing proves who the client is: logs and metrics name no identity for it (`unknown`),
//! only the workload its address belongs to, as such.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::inbound::dial_as_client;
use super::registry::{Fingerprint, OpenConnection, Via};
use super::{error_outcome, refuse_new, PodProxy, Report, Shared, Timeouts};
use crate::access_log::{Direction, Outcome, Peer, Protocol};
use crate::decision::{self, Inbound};
use crate::drain::DrainWatcher;
use crate::limits::{Activity, ConnectionPermit};
use crate::metrics::{Reporter, ResponseFlags};
use crate::peer::PeerIdentity;

/// Accepts plaintext connections for the pod until drain.
pub async fn serve(shared: Shared, pod: Arc<PodProxy>, listener: TcpListener, drain: DrainWatcher) {
    loop {
        let accepted = tokio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let permit = match shared.limits.connection(Some(&pod.limits.inbound)) {
                    Ok(permit) => permit,
                    Err(why) => {
                        refuse_new(&shared, &pod, stream, peer, why);
                        continue;
                    }
                };
                let (shared, pod, watcher) = (shared.clone(), pod.clone(), drain.clone());
                tokio::spawn(async move {
                    let _ = watcher
                        .run(handle(&shared, &pod, stream, peer, permit))
                        .await;
                });
            }
            Err(e) => super::accept_failed(&shared, &pod, "inbound plaintext accept", e).await,
        }
    }
    tracing::debug!(pod = %pod.name, "inbound plaintext listener closed");
}

/// One plaintext connection; `_permit` holds its place under the caps.
async fn handle(
    shared: &Shared,
    pod: &PodProxy,
    mut client_stream: TcpStream,
    client: SocketAddr,
    _permit: ConnectionPermit,
) {
    let started = Instant::now();
    let activity = Activity::new();
    let _ = client_stream.set_nodelay(true);
    // TPROXY keeps the original destination as the socket's local address.
    let original = match client_stream.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::debug!(pod = %pod.name, error = %e, "plaintext connection gone before handling");
            return;
        }
    };
    // Before the snapshot, so that no policy change can fall between decision and
    // registration (see the registry).
    let registration = pod.inbound.register(OpenConnection {
        client,
        via: Via::Plaintext {
            destination: original,
        },
    });
    let state = shared.state.snapshot();
    let src = state.workload_by_ip(client.ip()).cloned();
    let dst = state.workload_by_uid(&pod.uid).cloned();
    let report = Report::new(
        Reporter::Destination,
        Peer {
            addr: client,
            identity: PeerIdentity::unverified(src.as_ref()),
        },
        Peer {
            addr: original,
            identity: PeerIdentity::Verified {
                identity: pod.identity.clone(),
                workload: dst.clone(),
            },
        },
        None,
        Direction::Inbound,
        Protocol::Tcp,
        started,
    );
    let Some(dst) = dst else {
        report.refused(
            shared,
            ResponseFlags::NoHealthyUpstream,
            Outcome::Refused {
                reason: format!("pod {} is no longer in the state", pod.name).into(),
            },
        );
        return;
    };
    let decided = decision::inbound_plaintext(
        &state,
        &dst,
        client.ip(),
        original,
        decision::default_mtls(shared.settings.strict_inbound),
    );
    registration.decided_on(Fingerprint::of(&state, &dst));
    drop(state);
    match decided {
        Inbound::Refuse {
            status,
            reason,
            denied_by,
        } => {
            report.refused_inbound(shared, status, &reason, denied_by.as_deref());
        }
        Inbound::Accept { destination, .. } => {
            match dial_as_client(shared, pod, client, destination).await {
                Ok(mut upstream) => {
                    report
                        .copy_registered(
                            &shared.metrics,
                            &mut client_stream,
                            &mut upstream,
                            activity,
                            Timeouts::plaintext(shared),
                            registration,
                        )
                        .await
                }
                Err(e) => report.refused(
                    shared,
                    ResponseFlags::UpstreamConnectionFailure,
                    error_outcome(&e),
                ),
            }
        }
    }
}
