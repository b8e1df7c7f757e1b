//! Shared fixtures for Ambit's end-to-end tests: a builder of nodes and pods as network
//! namespaces, cleaned up when the test ends (also when it panics).
//!
//! ```text
//!  fabric netns: bridge br0 (10.77.0.0/24 between nodes)
//!    |-- n1 <veth> eth0 [node 1: 10.77.0.11, ip_forward] p0 <veth> eth0 [pod: 10.77.1.2/32]
//!    |                                                    p1 <veth> eth0 [pod: 10.77.1.3/32]
//!    '-- n2 <veth> eth0 [node 2: 10.77.0.12, ip_forward] p0 <veth> eth0 [pod: 10.77.2.2/32]
//! ```
//!
//! Every topology has its own fabric namespace, so address plans may repeat across tests running
//! at the same time; only namespace *names* must be unique (a short tag of the test name plus the
//! process id and a counter). Interfaces are created directly inside the namespaces, so their
//! names (`eth0`, `p0`, `n1`) never meet in the host's namespace and need no uniquifying.
//! Namespaces live under `/var/run/netns` (`ip netns add`); each topology also has its own
//! directory of symlinks to just its pods ([`Topology::netns_dir`]), which is what a ztunnel
//! under test scans, so concurrent tests with the same addresses never see each other's pods.
//!
//! - [`topology`]: [`Topology`] and its builder.
//! - [`ns`]: running commands and closures inside a namespace.
//! - [`server`]: a reply/echo server and a client helper, both inside pods.
//! - [`local_mesh`]: a whole local mesh (`ambitctl up`) per test, and requests inside its pods.
//! - [`ztunnel`]: in-process ztunnels over a topology, a test CA, metrics, access logs, a
//!   fabric sniffer and HBONE sockets made inside a pod.
//!
//! This is the one helper layer of the end-to-end tests; what is not about namespaces or
//! ztunnel (child processes, HTTP probes, bounded waits, the fake API server) lives in
//! `ambit-testing`, shared with every other crate's tests.

pub mod local_mesh;
pub mod ns;
pub mod server;
pub mod topology;
pub mod ztunnel;

pub use ns::{exec_in, in_netns};
pub use server::{connect_from, echo, read_greeting, ReplyServer, Seen};
pub use topology::{Pod, Topology, TopologyBuilder};

/// Path of a workspace binary (`ztunnel`, `ambit-controller`, `ambitctl`) built beside this
/// test, in the same target directory and profile.
///
/// `cargo test --workspace` builds every package's binaries with the same feature
/// resolution as the tests, so they are already there; asking cargo again from inside a test
/// (`cargo build -p X`) resolves features for X alone and rebuilds much of the dependency
/// graph, which cost minutes per run. A missing binary is a clear failure naming the command.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's own path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, or build it first with \
         `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

/// Whether these tests can build namespaces. Under `CI=true` a missing privilege is a failure
/// (panics with a clear message), never a silent pass; elsewhere the test prints a note and is
/// skipped (returns `false`).
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let why = format!(
        "{test}: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces \
         and iptables rules"
    );
    assert!(!ci, "{why}; CI=true, so this is a failure, not a skip");
    eprintln!("SKIPPED {why}; run as root (e.g. sudo -E cargo test -p ambit-tests)");
    false
}
