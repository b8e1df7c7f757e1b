//! The local mesh: a whole ambient mesh on one Linux machine, pods being network namespaces.
//! The subcommands (`up`, `down`, `status`, `proxy-config`, `apply`, `upgrade`, `sample`) live in the
//! binary; everything they share, and what the end-to-end tests reuse, lives here.
//!
//! - [`net`]: namespaces, bridge, veth pairs, addresses and routes (shared with the tests'
//!   `Topology`).
//! - [`cni`]: each node's CNI chain (`bridge`, `host-local`, then `ambit-cni`), called as a
//!   container runtime calls it, through which every pod is made and removed.
//! - [`objects`]: the sample as Kubernetes YAML, and the layout read back from any folder
//!   with the controller's own parser.
//! - [`cluster`]: build, start, upgrade a node's ztunnel live, and tear down (also after a
//!   crash).
//! - [`pods`]: one pod made as a node makes it (namespace, CNI ADD, then its app) and deleted
//!   as a node deletes it (its processes, CNI DEL, its namespace).
//! - [`state`]: `<state-dir>/cluster.json`, what a running cluster is made of.
//! - [`procs`]: processes in namespaces, pidfiles, stopping.
//! - [`admin`]: HTTP GETs to ops ports inside namespaces; [`inspect`]: status and
//!   proxy-config data from them.
//! - [`watch`]: following and pretty-printing logs while `up` runs.

pub mod admin;
pub mod cluster;
pub mod cni;
pub mod inspect;
pub mod net;
pub mod objects;
pub mod pods;
pub mod procs;
pub mod state;
pub mod watch;
