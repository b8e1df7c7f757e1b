//! Who is on the other side of a connection, and whether that was proven.
//!
//! An identity is proven in exactly two ways: the peer presented a certificate for it in
//! the mTLS handshake (HBONE), or the peer is the local pod itself (the capture only hands
//! ztunnel connections made in, or delivered into, that pod's own network namespace, and
//! ztunnel holds that pod's certificate). Anything else ztunnel can say about a peer, such
//! as the workload the state says owns its source address, is a lookup that anyone able to
//! send from that address gets for free: an operator may see it, but never as the identity.
//!
//! [`PeerIdentity`] makes the difference a type. Access logs and metrics ask it for the
//! identity, and an unverified peer has none to give, so a guess cannot be written down as
//! proof by accident.

use std::sync::Arc;

use ambit_hbone::Identity;

use crate::state::Workload;

/// What ztunnel knows about one side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The identity is proven (certificate, or the local pod itself).
    Verified {
        identity: Identity,
        /// The workload behind the identity. For a remote peer, the one owning its address,
        /// kept only when its identity is the proven one ([`PeerIdentity::verified`]: an
        /// address saying one thing and a certificate another is resolved in favour of the
        /// certificate). For an outbound destination, the one the decision chose, which a
        /// waypoint may stand in front of.
        workload: Option<Arc<Workload>>,
    },
    /// Nothing proves who the peer is (plaintext, or a handshake that did not happen).
    Unverified {
        /// The workload the state says owns the peer's address: a hint, shown as such.
        by_ip: Option<Arc<Workload>>,
    },
}

impl PeerIdentity {
    /// A peer that proved `identity`; `by_ip` is the workload owning its address, if any.
    pub fn verified(identity: Identity, by_ip: Option<&Arc<Workload>>) -> Self {
        let workload = by_ip.filter(|w| w.identity == identity).cloned();
        PeerIdentity::Verified { identity, workload }
    }

    /// A peer nothing proves; `by_ip` is the workload owning its address, if any.
    pub fn unverified(by_ip: Option<&Arc<Workload>>) -> Self {
        PeerIdentity::Unverified {
            by_ip: by_ip.cloned(),
        }
    }

    /// The proven identity, or `None`.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            PeerIdentity::Verified { identity, .. } => Some(identity),
            PeerIdentity::Unverified { .. } => None,
        }
    }

    /// The workload behind a proven identity.
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            PeerIdentity::Verified { workload, .. } => workload.as_ref(),
            PeerIdentity::Unverified { .. } => None,
        }
    }

    /// The workload an unverified peer's address belongs to (never set for a verified one).
    pub fn workload_by_ip(&self) -> Option<&Arc<Workload>> {
        match self {
            PeerIdentity::Verified { .. } => None,
            PeerIdentity::Unverified { by_ip } => by_ip.as_ref(),
        }
    }

    /// The same peer, no longer taken as proven (the handshake that would have proven it
    /// failed); its workload stays as the address hint.
    pub fn into_unverified(self) -> Self {
        match self {
            PeerIdentity::Verified { workload, .. } => PeerIdentity::Unverified { by_ip: workload },
            unverified => unverified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::workload;

    fn w(ns: &str, sa: &str) -> Arc<Workload> {
        Arc::new(Workload::try_from(workload(ns, "p", sa, "n1", "10.0.0.1")).expect("workload"))
    }

    fn id(s: &str) -> Identity {
        s.parse().expect("identity")
    }

    #[test]
    fn only_a_proven_identity_is_an_identity() {
        let legacy = w("legacy", "default");
        let plain = PeerIdentity::unverified(Some(&legacy));
        assert_eq!(plain.identity(), None);
        assert_eq!(plain.workload(), None);
        assert_eq!(plain.workload_by_ip(), Some(&legacy));

        let client = w("app", "client");
        let proven =
            PeerIdentity::verified(id("spiffe://cluster.local/ns/app/sa/client"), Some(&client));
        assert_eq!(
            proven.identity(),
            Some(&id("spiffe://cluster.local/ns/app/sa/client"))
        );
        assert_eq!(proven.workload(), Some(&client));
        assert_eq!(proven.workload_by_ip(), None);
    }

    #[test]
    fn an_address_contradicting_the_certificate_names_no_workload() {
        let other = w("legacy", "default");
        let proven =
            PeerIdentity::verified(id("spiffe://cluster.local/ns/app/sa/client"), Some(&other));
        assert_eq!(proven.workload(), None);
        assert_eq!(proven.workload_by_ip(), None);
    }

    #[test]
    fn a_failed_handshake_leaves_only_the_hint() {
        let server = w("app", "server");
        let expected =
            PeerIdentity::verified(id("spiffe://cluster.local/ns/app/sa/server"), Some(&server));
        let failed = expected.into_unverified();
        assert_eq!(failed.identity(), None);
        assert_eq!(failed.workload_by_ip(), Some(&server));
    }
}
