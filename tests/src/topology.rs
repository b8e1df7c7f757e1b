//! The topology builder: nodes and pods as network namespaces for one test, torn down on Drop.
//! The plumbing itself is `ambitctl::local::net`, the same code `ambitctl up` builds its local
//! cluster with.
//!
//! Address plan (fixed, because every topology has its own fabric; see the crate docs):
//! node k (1-based) is 10.77.0.(10+k)/24 on the fabric bridge; its pods are 10.77.k.2, .3, ...
//! as /32s behind a veth each, with 10.77.k.1 (on every node-side veth) as their gateway. Nodes
//! forward, and route each remote node's 10.77.m.0/24 via that node. Pods use strict rp_filter.
//! Everything is dual-stack: the IPv6 plan mirrors the IPv4 one in fd77::/48 (node k is
//! fd77::(10+k)/64, its pods fd77:k::2, ::3, ... with gateway fd77:k::1); see `ambitctl::local::net`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

use ambitctl::local::net;

use crate::ns::{run, NETNS_RUN_DIR};

/// Per-process counter that keeps namespace names of concurrent tests apart.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Where each topology publishes symlinks to its pods' namespaces, so a ztunnel under test can
/// scan only this test's pods (the real `/var/run/netns` may hold other tests' pods with the
/// same addresses).
const TEST_NETNS_ROOT: &str = "/run/ambit-tests";

/// A pod: a network namespace with one address, attached to a node.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The name given to the builder.
    pub name: String,
    /// The namespace name (under `/var/run/netns`).
    pub netns: String,
    /// The pod IP.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address.
    pub ip6: Ipv6Addr,
    /// The node's namespace name.
    pub node_netns: String,
}

/// A node: a forwarding namespace on the fabric.
#[derive(Debug, Clone)]
pub struct Node {
    /// The name given to the builder.
    pub name: String,
    /// The namespace name.
    pub netns: String,
    /// The node's fabric address.
    pub ip: Ipv4Addr,
    /// The node's IPv6 fabric address.
    pub ip6: Ipv6Addr,
}

/// Describes the nodes and pods of one test.
#[derive(Debug)]
pub struct TopologyBuilder {
    test: String,
    nodes: Vec<String>,
    pods: Vec<(String, String)>,
}

impl TopologyBuilder {
    /// A topology for the test called `test` (its name tags the namespaces).
    pub fn new(test: &str) -> Self {
        Self {
            test: test.to_owned(),
            nodes: Vec::new(),
            pods: Vec::new(),
        }
    }

    /// Adds a node.
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_owned());
        self
    }

    /// Adds a pod on an already added node.
    pub fn pod(mut self, name: &str, node: &str) -> Self {
        self.pods.push((name.to_owned(), node.to_owned()));
        self
    }

    /// Builds it, or returns `None` when not root outside CI (see [`crate::require_root`]).
    /// Panics when building fails: a test cannot run without its topology.
    pub fn build_or_skip(self) -> Option<Topology> {
        if !crate::require_root(&self.test) {
            return None;
        }
        let test = self.test.clone();
        match self.build() {
            Ok(topology) => Some(topology),
            Err(err) => panic!("{test}: cannot build the test topology: {err:#}"),
        }
    }

    /// Creates every namespace, link, address and route. On error, what was created is removed.
    pub fn build(self) -> anyhow::Result<Topology> {
        let tag: String = self
            .test
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(4)
            .collect::<String>()
            .to_ascii_lowercase();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{tag}{:04x}{id:x}", std::process::id() & 0xffff);
        let mut topo = Topology {
            netns_dir: Path::new(TEST_NETNS_ROOT).join(&prefix),
            prefix,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
        };
        // From here on, an early return drops `topo`, which deletes what exists so far.
        std::fs::create_dir_all(&topo.netns_dir)
            .with_context(|| format!("cannot create {}", topo.netns_dir.display()))?;

        let fabric = topo.add_netns("fab")?;
        net::make_fabric_bridge(&fabric, false)?;

        for (k, name) in self.nodes.iter().enumerate() {
            let netns = topo.add_netns(name)?;
            let ip = net::attach_node(&fabric, &netns, k + 1)?;
            topo.nodes.push(Node {
                name: name.clone(),
                netns,
                ip,
                ip6: net::node_ip6(k + 1)?,
            });
        }
        let indexed: Vec<(&str, usize)> = topo
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| (n.netns.as_str(), k + 1))
            .collect();
        net::route_between_nodes(&indexed)?;

        for (name, node_name) in &self.pods {
            let (k, node) = topo
                .nodes
                .iter()
                .enumerate()
                .find(|(_, n)| &n.name == node_name)
                .with_context(|| format!("pod {name}: no node {node_name}"))?;
            let (k, node) = (k + 1, node.clone());
            let j = topo
                .pods
                .iter()
                .filter(|p| p.node_netns == node.netns)
                .count();
            let netns = topo.add_netns(name)?;
            let pod_ip = net::attach_pod(&node.netns, k, &netns, j)?;
            let link = topo.netns_dir.join(&netns);
            std::os::unix::fs::symlink(Path::new(NETNS_RUN_DIR).join(&netns), &link)
                .with_context(|| format!("cannot create {}", link.display()))?;
            topo.pods.push(Pod {
                name: name.clone(),
                netns,
                ip: pod_ip,
                ip6: net::pod_ip6(k, j)?,
                node_netns: node.netns.clone(),
            });
        }
        Ok(topo)
    }
}

/// A built topology. Dropping it deletes every namespace it made (links and routes go with
/// them) and its namespace directory, also when the test panics.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    netns_dir: PathBuf,
    /// In creation order; deleted in reverse.
    namespaces: Vec<String>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
}

impl Topology {
    /// A builder for the test called `test`.
    pub fn builder(test: &str) -> TopologyBuilder {
        TopologyBuilder::new(test)
    }

    /// The most common shape: nodes `n1` and `n2`, pod `client` on n1 and pod `srv` on n2,
    /// so traffic crosses the fabric; add more before building.
    pub fn client_and_server(test: &str) -> TopologyBuilder {
        TopologyBuilder::new(test)
            .node("n1")
            .node("n2")
            .pod("client", "n1")
            .pod("srv", "n2")
    }

    fn add_netns(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}-{suffix}", self.prefix);
        // A namespace of this name can only be left over from a killed run with a reused pid;
        // add_netns replaces it.
        net::add_netns(&name)?;
        self.namespaces.push(name.clone());
        Ok(name)
    }

    /// The short unique prefix of every namespace name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A directory holding (symlinks to) exactly this topology's pod namespaces: what a ztunnel
    /// under test should scan instead of `/var/run/netns`.
    pub fn netns_dir(&self) -> &Path {
        &self.netns_dir
    }

    /// The pod called `name`. Panics if there is none (a bug in the test).
    pub fn pod(&self, name: &str) -> &Pod {
        match self.pods.iter().find(|p| p.name == name) {
            Some(pod) => pod,
            None => panic!("no pod {name} in this topology"),
        }
    }

    /// The node called `name`. Panics if there is none (a bug in the test).
    pub fn node(&self, name: &str) -> &Node {
        match self.nodes.iter().find(|n| n.name == name) {
            Some(node) => node,
            None => panic!("no node {name} in this topology"),
        }
    }

    /// Every namespace name, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for name in self.namespaces.iter().rev() {
            if let Err(err) = run("ip", &["netns", "del", name]) {
                eprintln!("topology cleanup: {err:#}");
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&self.netns_dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                eprintln!("topology cleanup: {}: {err}", self.netns_dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{connect_from, read_greeting, ReplyServer};

    fn listed() -> String {
        run("ip", &["netns", "list"]).unwrap_or_default()
    }

    #[test]
    fn pods_reach_each_other_across_and_within_nodes() {
        let Some(topo) = Topology::builder("fixture_routes")
            .node("n1")
            .node("n2")
            .pod("a", "n1")
            .pod("c", "n1")
            .pod("b", "n2")
            .build_or_skip()
        else {
            return;
        };
        let (a, b, c) = (topo.pod("a"), topo.pod("b"), topo.pod("c"));
        assert_eq!(a.ip, Ipv4Addr::new(10, 77, 1, 2));
        assert_eq!(c.ip, Ipv4Addr::new(10, 77, 1, 3));
        assert_eq!(b.ip, Ipv4Addr::new(10, 77, 2, 2));
        assert_eq!(b.ip6, "fd77:2::2".parse::<Ipv6Addr>().unwrap());
        let server = ReplyServer::start(b, 7000).unwrap();
        let local = ReplyServer::start(c, 7000).unwrap();
        let server6 = ReplyServer::start_v6(b, 7001).unwrap();
        let local6 = ReplyServer::start_v6(c, 7001).unwrap();
        for (from, to) in [
            (a, server.addr()),
            (a, local.addr()),
            (c, server.addr()),
            (a, server6.addr()),
            (a, local6.addr()),
            (c, server6.addr()),
        ] {
            let mut s = connect_from(from, to).unwrap();
            let seen = read_greeting(&mut s).unwrap();
            // No NAT anywhere: servers see pod IPs.
            assert_eq!(seen.peer, s.local_addr().unwrap());
            assert_eq!(seen.local, to);
        }
        assert!(topo.netns_dir().join(&a.netns).exists());
    }

    #[test]
    fn namespaces_are_deleted_even_when_the_test_panics() {
        if !crate::require_root("fixture_panic") {
            return;
        }
        let mut names = Vec::new();
        let mut dir = PathBuf::new();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let topo = Topology::builder("fixture_panic")
                .node("n1")
                .pod("a", "n1")
                .build()
                .unwrap();
            names = topo.namespaces().to_vec();
            dir = topo.netns_dir().to_path_buf();
            assert!(listed().contains(&names[0]));
            panic!("test failure inside a topology");
        }));
        assert!(result.is_err());
        assert_eq!(names.len(), 3, "fabric, node, pod");
        let after = listed();
        for name in &names {
            assert!(!after.contains(name.as_str()), "{name} leaked:\n{after}");
        }
        assert!(!dir.exists(), "{} leaked", dir.display());
    }
}
