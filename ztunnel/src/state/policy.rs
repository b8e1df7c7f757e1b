//! L4 authorization: the policies ztunnel enforces on inbound connections.
//!
//! The policy type, its decoding from the discovery protocol and its evaluation are the
//! shared engine's ([`ambit_policy`], Istio's `AuthorizationPolicy` semantics): this module
//! only says what ztunnel knows of a connection (identities, addresses, ports; never HTTP)
//! and which policies apply to a destination. Without HTTP attributes the engine fails
//! closed on rules that need them: such a rule never matches in an ALLOW policy, and in a
//! DENY (or AUDIT) policy it matches whenever its L4 parts do.

use std::net::IpAddr;

use ambit_hbone::Identity;
use ambit_policy::{Observer, Unobserved};
use serde::Serialize;

use super::store::State;
use super::workload::Workload;
use super::Authorization;

/// What policy sees of a connection arriving at a workload.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// Peer identity from its certificate; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// The outcome of L4 authorization, with the reason the access log prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// An AUDIT policy matched: log the connection as audited.
    pub audit: bool,
    /// "denied by default/deny-port (rule 0)", "no ALLOW policy matched (checked: a/x)"...
    pub reason: String,
    /// When denied, the policy that denied: the DENY policy's `namespace/name`, or
    /// `no ALLOW policy matched (a/x, b/y)` naming the ALLOW policies (the waypoint's words
    /// for the same). Always names from the state (never from the peer), so it is a bounded
    /// metric label.
    pub denied_by: Option<String>,
}

/// Evaluates `policies` (those applying to the destination) against a connection.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    conn: &ConnectionInfo<'_>,
) -> Verdict {
    evaluate_observed(policies, conn, &mut Unobserved)
}

/// [`evaluate`], reporting each step to `observer` (see [`ambit_policy::trace`]).
pub fn evaluate_observed<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    conn: &ConnectionInfo<'_>,
    observer: &mut dyn Observer,
) -> Verdict {
    let principal = conn.src_identity.map(ToString::to_string);
    let attrs = ambit_policy::Attributes {
        principal: principal.as_deref(),
        namespace: conn.src_identity.map(|id| id.namespace()),
        source_ip: conn.src_ip,
        destination_ip: conn.dst_ip,
        destination_port: conn.dst_port,
        http: None,
    };
    let v = ambit_policy::evaluate_observed(policies, &attrs, observer);
    let denied_by = match &v.decision {
        ambit_policy::Decision::DeniedBy(r) => Some(r.policy.clone()),
        ambit_policy::Decision::NoAllowMatched(keys) => {
            Some(format!("no ALLOW policy matched ({})", keys.join(", ")))
        }
        ambit_policy::Decision::AllowedBy(_) | ambit_policy::Decision::NoAllowPolicy => None,
    };
    Verdict {
        allowed: v.allowed(),
        audit: !v.audited.is_empty(),
        reason: v.to_string(),
        denied_by,
    }
}

/// Authorizes a connection to `dst` with the policies `state` applies to it (global, its
/// namespace's, and those selecting it).
pub fn authorize(state: &State, dst: &Workload, conn: &ConnectionInfo<'_>) -> Verdict {
    authorize_observed(state, dst, conn, &mut Unobserved)
}

/// [`authorize`], reporting each step to `observer`.
pub fn authorize_observed(
    state: &State,
    dst: &Workload,
    conn: &ConnectionInfo<'_>,
    observer: &mut dyn Observer,
) -> Verdict {
    let policies = state.policies_for(dst);
    evaluate_observed(policies.iter().map(|p| &**p), conn, observer)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
