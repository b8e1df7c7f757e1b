//! Ambit's L7 proxy (the waypoint): terminates HBONE for the namespaces or services that opt
//! in, applies L7 authorization, routing (Gateway API HTTPRoute/GRPCRoute) and resilience
//! (TrafficPolicy), and forwards over HBONE to the chosen endpoint's ztunnel. It never speaks
//! plaintext to workloads and does not capture traffic: ztunnel does both. The exception is
//! egress: an ExternalService bound to it ([`external`]) is dialled directly, with TLS
//! originated when its port says so.
//!
//! Map: [`server`] (HBONE in, protocol detection, hyper) → [`proxy`], which asks
//! [`decision`] what to do with a request (a pure function of the [`state`] snapshot, using
//! [`authn`] for tokens, [`policy`], [`route`] and [`resilience`]) and carries it out: [`refusal`]s answered
//! locally, or attempts sent through [`upstream`] (HBONE out, pooled hyper clients) under the
//! per-service runtime state (breaker, budget, outlier detection). [`state`] holds what the
//! controller (or a static file) said; [`metrics`] records each request ([`labels`]) and
//! [`otlp`] exports its span; [`admin`] serves metrics, readiness and the config dump.

pub mod admin;
mod attempt;
pub mod authn;
pub mod certs;
pub mod decision;
pub mod discovery;
pub mod duration;
pub mod external;
pub mod labels;
pub mod metrics;
pub mod otlp;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod refusal;
pub mod resilience;
pub mod route;
mod runtime;
pub mod server;
pub mod state;
pub mod upstream;

/// Errors carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type on both sides of the proxy.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
