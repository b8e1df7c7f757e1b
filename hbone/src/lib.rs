//! The ground every Ambit component stands on: who a workload is, how it proves it, and
//! the tunnel that carries its traffic.
//!
//! - [`identity`]: SPIFFE identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
//! - [`csr`], [`ca`], [`cert`], [`tls`]: certificate requests, the CA, workload
//!   certificates and the mutual-TLS configs that check identities.
//! - [`server`], [`pool`], [`client`], [`stream`], [`copy`]: the HBONE tunnel (HTTP/2
//!   `CONNECT` over that mutual TLS): the server, the client's connection pool, one client
//!   connection and stream, the tunnel stream, and a copy loop.
//! - [`control`]: the proxies' TLS channel to the controller (gRPC), checking its SPIFFE
//!   identity against the mesh root.
//! - [`connect_udp`]: the CONNECT-UDP request (RFC 9298): path template and headers.
//! - [`capsule`]: UDP datagrams as RFC 9297 capsules inside a CONNECT-UDP stream.
//! - [`throttle`]: per-cause rate limiting of log lines a peer can trigger at line rate.
//!
//! This crate knows nothing of Kubernetes, discovery or policy: callers decide who may
//! talk to whom; this crate proves who is talking and carries the bytes.

pub mod ca;
pub mod capsule;
pub mod cert;
pub mod client;
pub mod connect_udp;
pub mod control;
pub mod copy;
pub mod csr;
pub mod identity;
pub mod pool;
pub mod server;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod throttle;
pub mod tls;

pub use identity::Identity;
