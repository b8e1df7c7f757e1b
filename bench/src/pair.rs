//! Two network namespaces joined by one veth pair, a client and a server: the smallest
//! topology two proxies in dedicated mode can be compared on. Built with the same plumbing as
//! `ambitctl up` and the test fixture (`ambitctl::local::net`), deleted on drop.
//!
//! ```text
//!  <prefix>-c [eth0 10.78.0.1/24] <veth> [eth0 10.78.0.2/24] <prefix>-s
//! ```
//!
//! Both ends are created inside the namespaces, so nothing touches the host's links, routes
//! or iptables, and the addresses may repeat across concurrent runs (names are unique per
//! process and counter).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use ambitctl::local::net;
use anyhow::Context;

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// The server's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// The two namespaces; dropping it deletes them (the veth goes with them).
#[derive(Debug)]
pub struct NetnsPair {
    /// The client's namespace name.
    pub client: String,
    /// The server's namespace name.
    pub server: String,
    created: Vec<String>,
}

impl NetnsPair {
    /// Builds the pair, tagged with `tag` (a few letters) plus the pid and a counter. Each side
    /// gets the per-namespace socket settings every path under test shares: `tcp_tw_reuse`, so a
    /// run of short connections is limited by the path and not by TIME_WAIT.
    pub fn build(tag: &str) -> anyhow::Result<Self> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{tag}{:04x}{id:x}", std::process::id() & 0xffff);
        let mut pair = NetnsPair {
            client: format!("{prefix}-c"),
            server: format!("{prefix}-s"),
            created: Vec::new(),
        };
        // From here on an early return drops `pair`, which deletes what exists so far.
        for ns in [pair.client.clone(), pair.server.clone()] {
            net::add_netns(&ns)?;
            pair.created.push(ns);
        }
        net::ip(
            &pair.client,
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pair.server,
            ],
        )?;
        for (ns, ip) in [(&pair.client, CLIENT_IP), (&pair.server, SERVER_IP)] {
            net::ip(ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            net::ip(ns, &["link", "set", "eth0", "up"])?;
            net::exec_in(ns, &["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
                .with_context(|| format!("tuning {ns}"))?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(err) = net::del_netns(ns) {
                eprintln!("cleanup: {err:#}");
            }
        }
    }
}
