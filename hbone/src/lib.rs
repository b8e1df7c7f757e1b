//! The ground every Ambit component stands on: who a workload is, how it proves it, and
//! the tunnel that carries its traffic.
//!
//! - [`identity`]: SPIFFE identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
//! - [`csr`], [`ca`], [`cert`], [`tls`]: certificate requests, the CA, workload
//!   certificates and the mutual-TLS configs that check identities.
//!
//! This crate knows nothing of Kubernetes, discovery or policy: callers decide who may
//! talk to whom; this crate proves who is talking and carries the bytes.

pub mod ca;
pub mod cert;
pub mod csr;
pub mod identity;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;

pub use identity::Identity;
