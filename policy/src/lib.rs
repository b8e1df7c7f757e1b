//! Ambit's one authorization engine: Istio's `AuthorizationPolicy` as ztunnel, the
//! waypoint and the controller all read it. It holds the string patterns ([`pattern`]),
//! the parsed policy with its sources, operations and conditions ([`model`]), their
//! evaluation in Istio's order with a verdict naming the deciding policy and rule
//! ([`eval`]) with, on demand, its step-by-step record ([`trace`]), and the protobuf form
//! the controller sends and the proxies decode ([`wire`]). It also resolves Istio's
//! `PeerAuthentication` levels (mesh, namespace, workload, port) into the mTLS mode a
//! connection meets ([`peer_auth`]). HTTP attributes are optional, so ztunnel evaluates the
//! L4 subset and the waypoint the whole, with the same code and the same fail-closed rule
//! for what cannot be known.
//!
//! It is not where policies are bound to workloads or waypoints (the controller resolves
//! selectors and targets, each proxy indexes what applies to a destination), not where
//! Kubernetes objects are read (the controller's CRD types), and it does no I/O: it
//! decides, and the proxies act and log.

pub mod eval;
pub mod model;
pub mod pattern;
pub mod peer_auth;
pub mod trace;
pub mod wire;

pub use eval::{
    evaluate, evaluate_observed, explain, Attributes, Decision, HttpAttributes, RequestAuth,
    Verdict,
};
pub use model::{
    parse_ip_net, Action, Condition, ConditionError, Operation, Policy, Rule, Scope, Source, Test,
    Values,
};
pub use pattern::{PatternError, StringMatch};
pub use peer_auth::{effective_mode, Level, MtlsDecision, MtlsMode, PeerAuthentication};
pub use trace::{Check, Clause, Observer, PolicyTrace, RuleRef, RuleTrace, Trace, Unobserved};
pub use wire::WireError;
