//! L7 authorization: `AuthorizationPolicy` rules bound to this waypoint (by `targetRefs` to
//! its Gateway or to a Service it fronts), evaluated per HTTP request, or per connection for
//! traffic that is not HTTP.
//!
//! The policy type, its decoding and its evaluation are the shared engine's
//! ([`ambit_policy`]); ztunnel runs the same code without HTTP attributes, which is what the
//! waypoint does for opaque TCP too. This module keeps what is the waypoint's own: it
//! refuses a policy whose condition keys it does not know (rather than ignore a condition
//! someone relies on), and it reports a verdict in the form its 403 bodies and access log
//! print.

use ambit_policy::Decision;

pub use ambit_policy::{
    Action, Attributes, Condition, HttpAttributes, Operation, Policy, Rule, Source, StringMatch,
    Test,
};

/// Why a policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A `when` condition key this waypoint does not know; refusing it is safer than
    /// silently ignoring a condition someone relies on.
    #[error("policy {policy}: unsupported condition key {key:?}")]
    UnsupportedCondition { policy: String, key: String },
}

/// Rejects conditions the waypoint cannot evaluate.
pub fn validate(policy: &Policy) -> Result<(), PolicyError> {
    let unknown = policy
        .rules
        .iter()
        .flat_map(|r| &r.when)
        .find(|c| matches!(c.test(), Test::Unknown));
    match unknown {
        Some(c) => Err(PolicyError::UnsupportedCondition {
            policy: policy.key(),
            key: c.key().to_string(),
        }),
        None => Ok(()),
    }
}

/// The outcome of evaluation, as the waypoint reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `audited` lists AUDIT policies that matched.
    Allow { audited: Vec<String> },
    /// Denied by this policy (`namespace/name`), or by the lack of a matching ALLOW.
    Deny { by: String, audited: Vec<String> },
}

/// Evaluates `policies` (already the ones bound to this destination) for `attrs`.
pub fn evaluate(policies: &[&Policy], attrs: &Attributes<'_>) -> Verdict {
    evaluate_observed(policies, attrs, &mut ambit_policy::Unobserved)
}

/// [`evaluate`], reporting each step to `observer` (see [`ambit_policy::trace`]).
pub fn evaluate_observed(
    policies: &[&Policy],
    attrs: &Attributes<'_>,
    observer: &mut dyn ambit_policy::Observer,
) -> Verdict {
    let v = ambit_policy::evaluate_observed(policies.iter().copied(), attrs, observer);
    let audited = v.audited.into_iter().map(|r| r.policy).collect();
    match v.decision {
        Decision::DeniedBy(r) => Verdict::Deny {
            by: r.policy,
            audited,
        },
        // Name the ALLOW policies that did not let the request in, so the 403 is explainable.
        Decision::NoAllowMatched(keys) => Verdict::Deny {
            by: format!("no ALLOW policy matched ({})", keys.join(", ")),
            audited,
        },
        Decision::AllowedBy(_) | Decision::NoAllowPolicy => Verdict::Allow { audited },
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
