//! The local mesh: a whole ambient mesh on one Linux machine, pods being network namespaces.
//!
//! - [`net`]: namespaces, bridge, veth pairs, addresses and routes (shared with the tests).
pub mod admin;
pub mod cluster;
pub mod inspect;
pub mod net;
pub mod objects;
pub mod procs;
pub mod state;
pub mod watch;
