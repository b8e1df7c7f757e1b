//! The ground every Ambit component stands on: who a workload is, how it proves it, and
//! the tunnel that carries its traffic.
//!
//! - [`identity`]: SPIFFE identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
//!
//! This crate knows nothing of Kubernetes, discovery or policy: callers decide who may
//! talk to whom; this crate proves who is talking and carries the bytes.

pub mod identity;

pub use identity::Identity;
