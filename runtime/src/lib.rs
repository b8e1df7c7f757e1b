//! What every Ambit binary (ztunnel, the waypoint, the controller) runs besides its own
//! work, written once so that the binaries behave and are configured alike:
//!
//! - [`discovery`]: the proxies' side of `Discovery.Subscribe`: connecting, the `Hello`,
//!   ACK/NACK, the bearer credential, reconnection with jittered back-off and a status for
//!   the admin endpoint. What a push *means* stays with each proxy (a [`discovery::Subscriber`]).
//! - [`control`]: the channel to the controller (TLS checked against the mesh root and the
//!   controller's SPIFFE identity, or plaintext `http://` for tests on loopback).
//! - [`http`]: the small HTTP/1 server behind the operations ports (admin, metrics,
//!   readiness) and its response helpers; each binary supplies only its handler.
//! - [`logging`]: `tracing` set-up (text or JSON, env-filter, changeable at runtime).
//! - [`fs`]: files written whole or not at all (temp file, fsync, rename).
//! - [`flags`]: clap argument groups flattened into each binary's command line, so one
//!   setting has one flag and one environment variable everywhere.
//!
//! It holds no proxy logic, no policy and no Kubernetes; the ports and default trust domain
//! are `ambit-proto`'s, identities and TLS are `ambit-hbone`'s.

pub mod control;
pub mod discovery;
pub mod flags;
pub mod fs;
pub mod http;
pub mod logging;
