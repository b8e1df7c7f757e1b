//! Test support for Ambit's tests and benchmarks, kept out of the product crates so that no
//! binary ships it: the fake Kubernetes API server ([`apiserver`]), child processes that die
//! with the test ([`process`]), loopback HTTP probes ([`net`]), bounded waits ([`wait`]), and
//! the reader of the workspace's import graph that keeps files of a crate out of cycles
//! ([`imports`], run by `tests/import_cycles.rs`).
//!
//! Each helper lives here once; the network-namespace fixtures of the end-to-end tests live in
//! `ambit-tests` (they need root and the product crates), on top of this crate. Helpers return
//! `anyhow` errors that say what was waited for or which address failed, since a test's failure
//! message is all a reader gets.

pub mod apiserver;
pub mod imports;
pub mod net;
pub mod pki;
pub mod process;
pub mod wait;

pub use net::{free_port, http_get, http_get_async};
pub use process::Proc;
pub use wait::{eventually, wait, WAIT};
