//! Ambit's control plane: watches Kubernetes or a folder of YAML, pushes state to proxies
//! and signs workload certificates.
//!
//! The flow is one-way: sources ([`source`]) turn Kubernetes-format objects into
//! [`model::SourceEvent`]s; the [`model`] keeps the objects (shared with the source, not
//! copied), derives the wire resources proxies need and publishes versioned snapshots
//! that share unchanged entries; the [`discovery`] service filters a snapshot per proxy
//! and pushes only what changed, each push encoded on its own and freed once written. The [`ca`] signs workload certificates
//! for authenticated callers, authorized against the same model; both run in one TLS
//! [`server`], whose requests know their peer through [`conn`]; [`ops`] serves metrics and
//! readiness, and the [`dashboard`] built from the proxies' metrics; [`waypoints`] deploys a
//! waypoint per `ambit-waypoint` Gateway (Kubernetes); [`leader`] elects the one replica of
//! several that does the writes.
//! This crate does not talk to proxies' data paths and holds no per-connection state beyond
//! discovery subscriptions.

pub mod ca;
pub mod conn;
pub mod crd;
pub mod dashboard;
pub mod discovery;
pub mod leader;
pub mod model;
pub mod ops;
pub mod server;
pub mod source;
pub mod waypoints;
