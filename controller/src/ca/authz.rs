//! What an authenticated caller may obtain, decided from the model.
//!
//! The rule (the root ARCHITECTURE.md, "Wire formats"): a node proxy may obtain the identity of a pod scheduled on its
//! own node, and nothing else; a workload (a waypoint) may obtain only its own identity.
//! "Scheduled on its node" is read from the model's workloads (`spec.nodeName` of a pod
//! that exists and has not finished), so a compromised ztunnel can mint identities of
//! the pods it already hosts, never of the rest of the mesh. Until every source has
//! synced, the model cannot say who runs where, so the answer is "try again" rather
//! than a refusal a proxy would take as final.

use std::collections::BTreeSet;

use ambit_hbone::Identity;
use ambit_proto::discovery::{resource, ResourceKind};

use super::auth::Caller;
use crate::model::Snapshot;

/// Why a caller may not obtain an identity.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// No pod with the identity runs on the caller's node.
    #[error("node {node} may not obtain {identity}: no pod with that identity is scheduled on {node}{}", elsewhere_note(.elsewhere))]
    NotOnNode {
        /// The caller's node.
        node: String,
        /// The identity asked for.
        identity: Identity,
        /// Nodes where pods with that identity do run (for the operator reading this).
        elsewhere: Vec<String>,
    },
    /// A workload asked for an identity other than its own.
    #[error("{caller} may only obtain its own identity {own}, not {identity}")]
    NotOwnIdentity {
        /// The caller, for the message.
        caller: String,
        /// The caller's identity.
        own: Identity,
        /// The identity asked for.
        identity: Identity,
    },
    /// The model has not loaded yet, so scheduling is unknown.
    #[error("the controller has not finished loading the cluster state; retry shortly")]
    NotReady,
}

fn elsewhere_note(nodes: &[String]) -> String {
    if nodes.is_empty() {
        String::new()
    } else {
        format!(" (pods with it run on {})", nodes.join(", "))
    }
}

impl AuthzError {
    /// The gRPC status the caller gets.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            AuthzError::NotReady => tonic::Status::unavailable(self.to_string()),
            _ => tonic::Status::permission_denied(self.to_string()),
        }
    }
}

/// Decides whether `caller` may obtain `identity`, given the model's current state.
pub fn authorize(
    caller: &Caller,
    identity: &Identity,
    snapshot: &Snapshot,
) -> Result<(), AuthzError> {
    match caller {
        Caller::Workload { identity: own, .. } => {
            if own == identity {
                Ok(())
            } else {
                Err(AuthzError::NotOwnIdentity {
                    caller: caller.to_string(),
                    own: own.clone(),
                    identity: identity.clone(),
                })
            }
        }
        Caller::Node { node } => {
            if !snapshot.ready {
                return Err(AuthzError::NotReady);
            }
            let nodes = nodes_running(identity, snapshot);
            if nodes.contains(node.as_str()) {
                Ok(())
            } else {
                Err(AuthzError::NotOnNode {
                    node: node.clone(),
                    identity: identity.clone(),
                    elsewhere: nodes.into_iter().map(str::to_string).collect(),
                })
            }
        }
    }
}

/// The nodes where pods with `identity` are scheduled.
fn nodes_running<'a>(identity: &Identity, snapshot: &'a Snapshot) -> BTreeSet<&'a str> {
    snapshot
        .resources
        .iter()
        .filter(|(k, _)| k.kind == ResourceKind::Workload)
        .filter_map(|(_, e)| match &e.resource.kind {
            Some(resource::Kind::Workload(w)) => Some(w),
            _ => None,
        })
        .filter(|w| {
            !w.node.is_empty()
                && w.trust_domain == identity.trust_domain()
                && w.namespace == identity.namespace()
                && w.service_account == identity.service_account()
        })
        .map(|w| w.node.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ambit_proto::discovery::{Resource, Workload};

    use super::*;
    use crate::model::{Entry, Key};

    fn snapshot(pods: &[(&str, &str, &str, &str)]) -> Snapshot {
        let mut s = Snapshot {
            ready: true,
            ..Snapshot::default()
        };
        for (name, ns, sa, node) in pods {
            let w = Workload {
                uid: (*name).into(),
                name: (*name).into(),
                namespace: (*ns).into(),
                service_account: (*sa).into(),
                trust_domain: "cluster.local".into(),
                node: (*node).into(),
                ..Workload::default()
            };
            let resource = Resource {
                kind: Some(resource::Kind::Workload(w)),
            };
            s.resources.insert(
                Key::of(&resource).unwrap(),
                Arc::new(Entry {
                    resource,
                    hash: 0,
                    version: 1,
                    waypoint: None,
                }),
            );
        }
        s
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    fn node(n: &str) -> Caller {
        Caller::Node { node: n.into() }
    }

    #[test]
    fn nodes_obtain_identities_of_their_own_pods_only() {
        let s = snapshot(&[("p1", "a", "web", "node-a"), ("p2", "b", "db", "node-b")]);
        authorize(&node("node-a"), &id("a", "web"), &s).unwrap();
        let e = authorize(&node("node-a"), &id("b", "db"), &s).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("node node-a may not obtain spiffe://cluster.local/ns/b/sa/db"));
        assert!(msg.contains("node-b"), "{msg}");
        assert_eq!(e.to_status().code(), tonic::Code::PermissionDenied);
        let e = authorize(&node("node-a"), &id("a", "nobody"), &s).unwrap_err();
        assert!(e.to_string().ends_with("is scheduled on node-a"), "{e}");
        // Another trust domain never matches.
        let foreign = Identity::new("other.local", "a", "web").unwrap();
        assert!(authorize(&node("node-a"), &foreign, &s).is_err());
    }

    #[test]
    fn workloads_obtain_only_themselves_and_unsynced_models_say_retry() {
        let s = snapshot(&[]);
        let wp = Caller::Workload {
            identity: id("a", "waypoint"),
            pod: None,
        };
        authorize(&wp, &id("a", "waypoint"), &s).unwrap();
        let e = authorize(&wp, &id("a", "web"), &s).unwrap_err();
        assert!(matches!(e, AuthzError::NotOwnIdentity { .. }));
        let mut s = snapshot(&[("p1", "a", "web", "node-a")]);
        s.ready = false;
        let e = authorize(&node("node-a"), &id("a", "web"), &s).unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::Unavailable);
    }
}
