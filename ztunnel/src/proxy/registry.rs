//! The open inbound connections of one pod, so that a policy change reaches them.
//!
//! Policy is decided when a connection is accepted; without this, a DENY applied later
//! would only stop new connections while the open ones flowed on for as long as they
//! lived. Each accepted inbound connection (HBONE 15008 and plaintext 15006) registers what
//! its decision needs (the proven peer identity, the client address, the destination) with
//! a way to close it, and leaves when it ends ([`Registration`] is a guard). It registers
//! before taking its decision's snapshot, and then records what that decision depended on
//! ([`Fingerprint`]: the pod's workload, the authorization policies applying to it and
//! the PeerAuthentications that may, so a mode turned STRICT reaches open plaintext).
//!
//! [`reevaluate`] is the pod's watcher: it wakes on the state store's version `watch`,
//! takes the current fingerprint, and re-runs the accept-time decision ([`recheck`], a pure
//! function of a state snapshot) only for connections whose decision rests on another
//! fingerprint (or on none yet). Those it now refuses are closed at once; each closes
//! itself with one access-log line (outcome `revoked`, the reason naming the policy and
//! rule) and counts in `ambit_connections_revoked_total`. A push that does not touch the pod
//! costs one snapshot load and a few pointer comparisons per open connection.
//!
//! Comparing each connection's own fingerprint (rather than the watcher's last one) leaves
//! no gap: a connection decided on a state the watcher never looked at, or registered while
//! it was looking, still differs from the current fingerprint and is checked at the next
//! push, or was checked against it already.
//!
//! `--policy-reevaluation keep` leaves open connections alone (Istio's behaviour): the
//! watcher is not started.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ambit_hbone::Identity;
use tokio::sync::oneshot;

use super::{PodProxy, Shared};
use crate::decision::{self, Inbound};
use crate::drain::DrainWatcher;
use crate::state::{Authorization, MtlsMode, PeerAuthentication, State, Workload};

/// Whether a policy change reaches connections that are already open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Reevaluation {
    /// Re-check open inbound connections when the pod's policies change; close the denied.
    #[default]
    Close,
    /// Leave open connections alone; policy applies to new connections only (as Istio).
    Keep,
}

/// How an open inbound connection reached the pod: what its decision needs again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// An HBONE `CONNECT`: the peer's certificate proved `peer`; `authority` was asked for.
    Hbone {
        peer: Identity,
        authority: SocketAddr,
    },
    /// Plaintext captured on 15006, to its original destination.
    Plaintext { destination: SocketAddr },
}

/// One open inbound connection, as its decision saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenConnection {
    /// The client's address (the source policy sees).
    pub client: SocketAddr,
    pub via: Via,
}

/// Why an open connection was closed: the new decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The status a new connection would get (401 or 403).
    pub status: u16,
    /// The decision's reason, naming the policy and rule.
    pub reason: String,
}

/// Re-runs the accept-time decision for `conn` on `state`; `Some` when it is now refused by
/// authorization (policy, a waypoint requirement, a STRICT mTLS mode for plaintext; ztunnel's
/// own mode is `default_mode`). Other refusals (the pod's address or enrollment changed) are
/// not handled here: enrollment stops such a pod and drains its connections.
pub fn recheck(
    state: &State,
    pod: &Workload,
    conn: &OpenConnection,
    default_mode: MtlsMode,
) -> Option<Revocation> {
    let client = conn.client.ip();
    let decided = match &conn.via {
        Via::Hbone { peer, authority } => {
            decision::inbound(state, pod, Some(peer), client, &authority.to_string())
        }
        Via::Plaintext { destination } => {
            decision::inbound_plaintext(state, pod, client, *destination, default_mode)
        }
    };
    match decided {
        Inbound::Refuse {
            status: status @ (401 | 403),
            reason,
            ..
        } => Some(Revocation { status, reason }),
        Inbound::Refuse { .. } | Inbound::Accept { .. } => None,
    }
}

/// What an inbound decision for the pod depends on besides the connection itself. Equal
/// fingerprints mean an open connection's decision cannot have changed (the waypoint
/// identity set aside: it changes with workloads and services, not with policy).
#[derive(Debug, PartialEq, Eq)]
pub struct Fingerprint {
    workload: Arc<Workload>,
    policies: Vec<Arc<Authorization>>,
    peer_authentications: Vec<Arc<PeerAuthentication>>,
}

impl Fingerprint {
    /// The fingerprint of `pod` (as `state` has it) in `state`.
    pub fn of(state: &State, pod: &Arc<Workload>) -> Arc<Fingerprint> {
        Arc::new(Fingerprint {
            workload: pod.clone(),
            policies: state.policies_for(pod),
            peer_authentications: state.peer_authentications_for(pod),
        })
    }
}

/// The open inbound connections of one pod. Cheap to share (`Arc`).
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    open: HashMap<u64, Entry>,
}

/// Below this many slots the map keeps its capacity: shrinking would buy nothing.
const KEEP_CAPACITY: usize = 1024;

impl Inner {
    /// Removes a connection's entry. A hash map keeps its largest capacity, so after a
    /// burst (8,900 connections to one pod left 2.2 MB here) it gives back what a quarter
    /// of it would not use; halving at a quarter full keeps the rehashing linear overall.
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id);
        if self.open.capacity() > KEEP_CAPACITY && self.open.len() * 4 < self.open.capacity() {
            self.open.shrink_to(self.open.len() * 2);
        }
        entry
    }
}

#[derive(Debug)]
struct Entry {
    conn: OpenConnection,
    /// What the connection's decision (or its last re-check) rested on; `None` until the
    /// decision is made.
    decided_on: Option<Arc<Fingerprint>>,
    revoke: oneshot::Sender<Revocation>,
}

/// Critical sections are map operations that cannot panic half-way, so a poisoned lock
/// still holds consistent data.
fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Registers an open connection until the returned guard is dropped. Call it before
    /// taking the snapshot the connection is decided on, then [`Registration::decided_on`].
    pub fn register(self: &Arc<Self>, conn: OpenConnection) -> Registration {
        let (revoke, revoked) = oneshot::channel();
        let mut inner = lock(&self.inner);
        let id = inner.next;
        inner.next += 1;
        inner.open.insert(
            id,
            Entry {
                conn,
                decided_on: None,
                revoke,
            },
        );
        Registration {
            registry: self.clone(),
            id,
            revoked,
        }
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        lock(&self.inner).open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-checks every open connection not decided on `current` with `check`, closes those
    /// it refuses and returns how many; the others are recorded as decided on `current`.
    /// `check` runs outside the lock, so connections keep opening and closing meanwhile.
    pub fn revoke_where(
        &self,
        current: &Arc<Fingerprint>,
        check: impl Fn(&OpenConnection) -> Option<Revocation>,
    ) -> usize {
        let stale: Vec<(u64, OpenConnection)> = lock(&self.inner)
            .open
            .iter()
            .filter(|(_, e)| e.decided_on.as_ref() != Some(current))
            .map(|(id, e)| (*id, e.conn.clone()))
            .collect();
        if stale.is_empty() {
            return 0;
        }
        let checked: Vec<(u64, Option<Revocation>)> = stale
            .into_iter()
            .map(|(id, conn)| (id, check(&conn)))
            .collect();
        let mut inner = lock(&self.inner);
        let mut closed = 0;
        for (id, verdict) in checked {
            match verdict {
                Some(revocation) => {
                    // Gone meanwhile: it ended on its own.
                    if let Some(entry) = inner.remove(id) {
                        closed += usize::from(entry.revoke.send(revocation).is_ok());
                    }
                }
                None => {
                    if let Some(entry) = inner.open.get_mut(&id) {
                        entry.decided_on = Some(current.clone());
                    }
                }
            }
        }
        closed
    }
}

/// One connection's place in the registry; leaves it when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    revoked: oneshot::Receiver<Revocation>,
}

impl Registration {
    /// Records what the connection's decision rested on.
    pub fn decided_on(&self, fingerprint: Arc<Fingerprint>) {
        if let Some(entry) = lock(&self.registry.inner).open.get_mut(&self.id) {
            entry.decided_on = Some(fingerprint);
        }
    }

    /// Resolves when a policy change closes this connection (never, otherwise).
    pub async fn revoked(&mut self) -> Revocation {
        match (&mut self.revoked).await {
            Ok(r) => r,
            // A sender is only dropped after sending, or with this registration's own
            // entry; so no revocation can come any more.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.inner).remove(self.id);
    }
}

/// The pod's watcher: re-checks its open inbound connections against each new state,
/// until the pod drains.
pub async fn reevaluate(shared: Shared, pod: Arc<PodProxy>, drain: DrainWatcher) {
    let mut versions = shared.state.watch_version();
    loop {
        tokio::select! {
            _ = drain.signaled() => break,
            changed = versions.changed() => if changed.is_err() { break },
        }
        if pod.inbound.is_empty() {
            continue;
        }
        let state = shared.state.snapshot();
        let Some(workload) = state.workload_by_uid(&pod.uid).cloned() else {
            // Gone from the state: enrollment stops the pod and drains its connections.
            continue;
        };
        let current = Fingerprint::of(&state, &workload);
        let default_mode = decision::default_mtls(shared.settings.strict_inbound);
        let closed = pod.inbound.revoke_where(&current, |conn| {
            recheck(&state, &workload, conn, default_mode)
        });
        if closed > 0 {
            tracing::info!(
                pod = %pod.name,
                closed,
                version = state.version(),
                "policy change closed open inbound connections"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::*;
    use crate::state::Store;
    use ambit_proto::discovery as pb;
    use pb::{PolicyAction as A, PolicyScope as S};

    fn deny_from(principal: &str, block_ip: &str) -> pb::Authorization {
        policy(
            "app",
            "deny-some",
            S::Namespace,
            A::Deny,
            vec![
                pb::Rule {
                    from: vec![pb::Source {
                        principals: vec![exact(principal)],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                pb::Rule {
                    from: vec![pb::Source {
                        ip_blocks: vec![block(&format!("{block_ip}/32"))],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        )
    }

    fn state(policies: Vec<pb::Authorization>) -> Arc<State> {
        let mut upserts = vec![res_w(workload("app", "srv", "srv", "n2", "10.0.2.1"))];
        upserts.extend(policies.into_iter().map(res_a));
        let mut store = Store::new(Some("n2"));
        store.apply(full(1, upserts)).expect("apply");
        store.snapshot()
    }

    fn hbone(sa: &str, client: &str) -> OpenConnection {
        OpenConnection {
            client: format!("{client}:40000").parse().expect("addr"),
            via: Via::Hbone {
                peer: format!("spiffe://cluster.local/ns/app/sa/{sa}")
                    .parse()
                    .expect("id"),
                authority: "10.0.2.1:8080".parse().expect("addr"),
            },
        }
    }

    fn plain(client: &str) -> OpenConnection {
        OpenConnection {
            client: format!("{client}:40000").parse().expect("addr"),
            via: Via::Plaintext {
                destination: "10.0.2.1:8080".parse().expect("addr"),
            },
        }
    }

    #[test]
    fn recheck_is_the_accept_decision_on_the_new_state() {
        let before = state(vec![]);
        let after = state(vec![deny_from("cluster.local/ns/app/sa/bad", "10.0.9.9")]);
        let srv = |s: &State| s.workload_by_uid("app/srv").cloned().expect("srv");
        let cases = [
            (
                hbone("bad", "10.0.1.1"),
                Some("denied by app/deny-some (rule 0)"),
            ),
            (hbone("good", "10.0.1.2"), None),
            (plain("10.0.9.9"), Some("denied by app/deny-some (rule 1)")),
            (plain("10.0.9.8"), None),
        ];
        for (conn, want) in cases {
            assert_eq!(
                recheck(&before, &srv(&before), &conn, MtlsMode::Permissive),
                None,
                "{conn:?}"
            );
            let got = recheck(&after, &srv(&after), &conn, MtlsMode::Permissive);
            assert_eq!(got.as_ref().map(|r| r.reason.as_str()), want, "{conn:?}");
            if let Some(r) = got {
                assert_eq!(r.status, 403);
            }
        }
        // Strict mode turns every plaintext connection away, HBONE stays.
        assert_eq!(
            recheck(&before, &srv(&before), &plain("10.0.9.8"), MtlsMode::Strict).map(|r| r.status),
            Some(401)
        );
        assert_eq!(
            recheck(
                &before,
                &srv(&before),
                &hbone("good", "10.0.1.2"),
                MtlsMode::Strict
            ),
            None
        );
    }

    #[test]
    fn an_allow_list_that_stops_matching_revokes_too() {
        let allow_good = policy(
            "app",
            "allow-good",
            S::Namespace,
            A::Allow,
            vec![pb::Rule {
                from: vec![pb::Source {
                    principals: vec![exact("cluster.local/ns/app/sa/good")],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let s = state(vec![allow_good]);
        let srv = s.workload_by_uid("app/srv").cloned().expect("srv");
        let r =
            recheck(&s, &srv, &hbone("other", "10.0.1.3"), MtlsMode::Permissive).expect("revoked");
        assert!(r.reason.contains("app/allow-good"), "{}", r.reason);
        assert_eq!(
            recheck(&s, &srv, &hbone("good", "10.0.1.2"), MtlsMode::Permissive),
            None
        );
    }

    #[test]
    fn a_namespace_turned_strict_revokes_open_plaintext_but_not_its_permissive_port() {
        let srv = res_w(workload("app", "srv", "srv", "n2", "10.0.2.1"));
        let strict_ns = res_pa(peer_auth(
            "app",
            "strict",
            S::Namespace,
            pb::MtlsMode::Strict,
            &[],
            &[],
        ));
        let open_8080 = res_pa(peer_auth(
            "app",
            "srv-8080",
            S::WorkloadSelector,
            pb::MtlsMode::Unset,
            &[("app", "srv")],
            &[(8080, pb::MtlsMode::Permissive)],
        ));
        let mut store = Store::new(Some("n2"));
        let mut srv_labelled = srv.clone();
        if let Some(pb::resource::Kind::Workload(w)) = &mut srv_labelled.kind {
            w.labels.insert("app".into(), "srv".into());
        }
        store
            .apply(full(1, vec![srv_labelled.clone()]))
            .expect("apply");
        let before = store.snapshot();
        let w_before = before.workload_by_uid("app/srv").cloned().expect("srv");
        let on_9090 = OpenConnection {
            client: "10.0.9.9:40000".parse().expect("addr"),
            via: Via::Plaintext {
                destination: "10.0.2.1:9090".parse().expect("addr"),
            },
        };
        assert_eq!(
            recheck(&before, &w_before, &plain("10.0.9.9"), MtlsMode::Permissive),
            None
        );
        store
            .apply(full(2, vec![srv_labelled, strict_ns, open_8080]))
            .expect("apply");
        let after = store.snapshot();
        let w = after.workload_by_uid("app/srv").cloned().expect("srv");
        // The fingerprint moved, so the watcher looks at the open connections again.
        assert_ne!(
            Fingerprint::of(&before, &w_before),
            Fingerprint::of(&after, &w)
        );
        let r = recheck(&after, &w, &on_9090, MtlsMode::Permissive).expect("revoked");
        assert_eq!(r.status, 401);
        assert_eq!(
            r.reason,
            "plaintext refused: mTLS STRICT by PeerAuthentication app/strict (namespace)"
        );
        assert_eq!(
            recheck(&after, &w, &plain("10.0.9.9"), MtlsMode::Permissive),
            None,
            "port 8080 is PERMISSIVE for this workload"
        );
        assert_eq!(
            recheck(&after, &w, &hbone("good", "10.0.1.2"), MtlsMode::Permissive),
            None
        );
    }

    #[test]
    fn a_burst_of_connections_leaves_no_large_map_behind() {
        let registry = Arc::new(Registry::default());
        let burst: Vec<Registration> = (0..9_000)
            .map(|i| registry.register(plain(&format!("10.1.{}.{}", i / 250, i % 250))))
            .collect();
        let grown = lock(&registry.inner).open.capacity();
        assert!(grown >= 9_000, "capacity {grown}");
        let kept: Vec<Registration> = burst.into_iter().skip(8_990).collect();
        let capacity = lock(&registry.inner).open.capacity();
        assert!(
            capacity <= KEEP_CAPACITY * 2,
            "{capacity} slots kept for {} connections (it grew to {grown})",
            registry.len()
        );
        assert_eq!(registry.len(), 10);
        drop(kept);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn only_refused_connections_are_told_and_ended_ones_leave() {
        let before = state(vec![]);
        let srv_before = before.workload_by_uid("app/srv").cloned().expect("srv");
        let registry = Arc::new(Registry::default());
        let mut victim = registry.register(hbone("bad", "10.0.1.1"));
        let keeper = registry.register(hbone("good", "10.0.1.2"));
        let gone = registry.register(plain("10.0.9.9"));
        for r in [&victim, &keeper, &gone] {
            r.decided_on(Fingerprint::of(&before, &srv_before));
        }
        drop(gone);
        assert_eq!(registry.len(), 2);
        let after = state(vec![deny_from("cluster.local/ns/app/sa/bad", "10.0.9.9")]);
        let srv = after.workload_by_uid("app/srv").cloned().expect("srv");
        let current = Fingerprint::of(&after, &srv);
        let closed =
            registry.revoke_where(&current, |c| recheck(&after, &srv, c, MtlsMode::Permissive));
        assert_eq!(closed, 1);
        let r = victim.revoked().await;
        assert_eq!(r.reason, "denied by app/deny-some (rule 0)");
        // The revoked entry left the registry; the kept one is still there, now recorded
        // as decided on the current state: the next pass does not look at it again.
        assert_eq!(registry.len(), 1);
        let looked = std::cell::Cell::new(0);
        registry.revoke_where(&current, |_| {
            looked.set(looked.get() + 1);
            None
        });
        assert_eq!(looked.get(), 0);
        drop((victim, keeper));
        assert!(registry.is_empty());
    }

    #[test]
    fn a_connection_without_a_decision_yet_is_checked_against_the_current_state() {
        // Registered, decision not recorded yet (a push landed in between): the pass checks it.
        let registry = Arc::new(Registry::default());
        let _undecided = registry.register(hbone("bad", "10.0.1.1"));
        let after = state(vec![deny_from("cluster.local/ns/app/sa/bad", "10.0.9.9")]);
        let srv = after.workload_by_uid("app/srv").cloned().expect("srv");
        let closed = registry.revoke_where(&Fingerprint::of(&after, &srv), |c| {
            recheck(&after, &srv, c, MtlsMode::Permissive)
        });
        assert_eq!(closed, 1);
    }

    #[test]
    fn an_unrelated_push_leaves_the_fingerprint_alone() {
        let mut store = Store::new(Some("n2"));
        let srv = res_w(workload("app", "srv", "srv", "n2", "10.0.2.1"));
        let other_ns_deny = policy("other", "deny-all", S::Namespace, A::Deny, vec![]);
        store
            .apply(full(1, vec![srv, res_a(other_ns_deny)]))
            .expect("apply");
        let fp = |store: &Store| {
            let s = store.snapshot();
            let w = s.workload_by_uid("app/srv").cloned().expect("srv");
            Fingerprint::of(&s, &w)
        };
        let first = fp(&store);
        store
            .apply(delta(
                2,
                vec![res_w(workload("other", "x", "x", "n1", "10.0.3.1"))],
                vec![],
            ))
            .expect("apply");
        assert_eq!(first, fp(&store));
        store
            .apply(delta(
                3,
                vec![res_a(deny_from("cluster.local/ns/app/sa/bad", "10.0.9.9"))],
                vec![],
            ))
            .expect("apply");
        assert_ne!(first, fp(&store));
    }
}
