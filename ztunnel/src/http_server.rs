//! The operations ports' HTTP server, shared by every binary (see [`ambit_runtime::http`]);
//! ztunnel's servers stop at drain and give their connections the drain deadline, and their
//! listeners move to a successor ztunnel on upgrade ([`bind_with`]).

use std::future::Future;
use std::net::SocketAddr;

pub use ambit_runtime::http::*;
use tokio::net::TcpListener;

use crate::drain::DrainWatcher;
use crate::handover::{Handover, Owner, Role};

/// Stops accepting when drain starts; each connection holds a watcher, so the drain waits for
/// it, and is dropped at the drain deadline.
impl Shutdown for DrainWatcher {
    async fn stopped(&self) {
        self.signaled().await;
    }

    async fn run_connection<F>(self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Dropped at the deadline: nothing more to report for an operations request.
        let _ = self.run(connection).await;
    }
}

/// Takes the listener for `role` a previous ztunnel handed over, or binds `addr` (with
/// SO_REUSEPORT, so a successor can bind beside it); registers it for a successor for as long
/// as it serves.
pub async fn bind_with(
    name: &'static str,
    role: Role,
    addr: SocketAddr,
    handover: &Handover,
) -> Result<Listener, ServerError> {
    let bind_err = |source| ServerError::Bind { name, addr, source };
    let netns = crate::handover::own_netns()
        .inspect_err(|e| tracing::warn!(server = name, error = %e, "cannot identify our network namespace; not taking or offering this listener"))
        .ok();
    let inherited = netns.and_then(|n| handover.inherited.take_ops(n, role, addr));
    let std = match inherited {
        Some(l) => {
            tracing::info!(server = name, %addr, "listener handed over by the previous ztunnel");
            l
        }
        None => crate::handover::bind_reuseport(addr, 1024)
            .map_err(bind_err)?
            .into(),
    };
    std.set_nonblocking(true).map_err(bind_err)?;
    let listener = TcpListener::from_std(std).map_err(bind_err)?;
    let registered = netns.and_then(|netns| {
        handover
            .registry
            .register(Owner::Ops { netns }, role, &listener)
            .inspect_err(|e| tracing::warn!(server = name, error = %e, "listener not registered for a successor"))
            .ok()
    });
    let listener = Listener::from_listener(name, addr, listener)?;
    Ok(match registered {
        Some(registered) => listener.hold_while_serving(registered),
        None => listener,
    })
}
