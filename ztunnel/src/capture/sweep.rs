//! The start-up sweep of orphaned capture rules. Rules belong to a pod's enrollment and only
//! un-enrollment removes them, so a pod that left the mesh while no ztunnel ran on its node
//! (its namespace lost the label, the pod opted out) keeps rules nobody will remove: it stays
//! refused, fail closed, for good. A pod *deleted* meanwhile leaves nothing: its namespace,
//! rules and all, goes with it (and `ambit-cni`'s DEL removes them first).
//!
//! So once ztunnel holds an authoritative state (the controller's first full state, or the
//! static file; never the kept state alone, which may predate the change), it scans the
//! namespaces of `--netns-dir` once, decides on one snapshot which ones are orphaned
//! ([`orphaned`], a pure function), and removes our rules there under the capture manager's
//! lock, re-deciding on the current state first. The decision is conservative: only a
//! namespace whose addresses belong to workloads of *this* node that are all outside the mesh
//! is touched. An address the state does not know (a pod the CNI plugin captured before the
//! controller published it) or a workload of another node (the netns directory may be shared,
//! as in the local mesh) is left as it is.

use std::net::IpAddr;
use std::sync::Arc;

use crate::state::{State, StateReader, TunnelProtocol, Workload};

use super::inpod::CaptureManager;
use super::netns;

/// The workload whose rules a namespace with `addrs` outlived: every workload owning one of
/// the addresses is on `node` and outside the mesh. `None`: keep the namespace as it is.
pub fn orphaned(state: &State, node: &str, addrs: &[IpAddr]) -> Option<Arc<Workload>> {
    let owners: Vec<&Arc<Workload>> = addrs
        .iter()
        .filter(|ip| !ip.is_loopback())
        .filter_map(|ip| state.workload_by_ip(*ip))
        .collect();
    let first = owners.first()?;
    let outside = owners
        .iter()
        .all(|w| &*w.node == node && w.protocol != TunnelProtocol::Hbone);
    outside.then(|| Arc::clone(first))
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Namespaces examined.
    pub scanned: usize,
    /// `namespace/name` of each pod whose rules were removed.
    pub released: Vec<String>,
}

/// Scans `manager`'s netns directory once and removes the rules of every orphaned namespace
/// (see the module docs). Failures are logged and the sweep goes on: a namespace it could not
/// clean stays closed, as before.
pub async fn sweep(manager: &CaptureManager, state: &StateReader, node: &str) -> Swept {
    let dir = manager.config().netns_dir.clone();
    let scan_dir = dir.clone();
    let scanned = match tokio::task::spawn_blocking(move || netns::scan(&scan_dir)).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "capture sweep: cannot scan namespaces");
            return Swept::default();
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "capture sweep: scan failed");
            return Swept::default();
        }
    };
    let mut swept = Swept {
        scanned: scanned.len(),
        ..Swept::default()
    };
    let snapshot = state.snapshot();
    for (handle, addrs) in scanned {
        let Some(w) = orphaned(&snapshot, node, &addrs) else {
            continue;
        };
        let path = handle.path().to_path_buf();
        let still =
            || orphaned(&state.snapshot(), node, &addrs).is_some_and(|now| now.uid == w.uid);
        match manager.remove_orphaned(&w.uid, handle, still).await {
            Ok(true) => {
                tracing::info!(
                    pod = %format!("{}/{}", w.namespace, w.name),
                    netns = %path.display(),
                    "capture rules removed: the pod left the mesh while no ztunnel served it"
                );
                swept.released.push(format!("{}/{}", w.namespace, w.name));
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                pod = %format!("{}/{}", w.namespace, w.name),
                error = %crate::telemetry::error_chain(&e),
                "capture sweep: cannot remove the rules of a pod outside the mesh"
            ),
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{node_state as state, workload};
    use ambit_proto::discovery as pb;

    fn plain(mut w: pb::Workload) -> pb::Workload {
        w.tunnel_protocol = pb::TunnelProtocol::None as i32;
        w
    }

    #[test]
    fn only_pods_of_this_node_outside_the_mesh_are_orphaned() {
        let st = state(vec![
            workload("shop", "meshed", "a", "n1", "10.0.0.2"),
            plain(workload("legacy", "left", "l", "n1", "10.0.0.3")),
            plain(workload("legacy", "far", "l", "n2", "10.0.0.4")),
            workload("shop", "far-meshed", "a", "n2", "10.0.0.5"),
        ]);
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
        // (the namespace's addresses, the orphaned pod's name if any)
        let cases: [(&[&str], Option<&str>); 8] = [
            (&["127.0.0.1", "10.0.0.3"], Some("left")),
            (&["::1", "10.0.0.3", "fe80::1"], Some("left")),
            (&["127.0.0.1", "10.0.0.2"], None),
            // Another node's pods, in or out of the mesh: theirs to handle.
            (&["10.0.0.4"], None),
            (&["10.0.0.5"], None),
            // Unknown: maybe a pod the controller has not published yet.
            (&["127.0.0.1", "10.9.9.9"], None),
            (&["127.0.0.1"], None),
            // One address in the mesh is enough to keep everything.
            (&["10.0.0.3", "10.0.0.2"], None),
        ];
        for (addrs, want) in cases {
            let got = orphaned(&st, "n1", &ips(addrs)).map(|w| w.name.to_string());
            assert_eq!(got.as_deref(), want, "{addrs:?}");
        }
    }
}
