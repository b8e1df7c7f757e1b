//! Network plumbing for nodes and pods as network namespaces: the one place that creates
//! namespaces, the fabric bridge, veth pairs, addresses and routes. `ambitctl up` builds its
//! local cluster's fabric and nodes with it, and the end-to-end test fixture (`ambit-tests`'
//! `Topology`) builds its topologies with it, so the two cannot drift apart. The local mesh's
//! pods are not plugged in here: their namespaces get `eth0`, addresses and routes from the
//! node's CNI chain (`super::cni`: the reference `bridge` plugin puts the node-side veths on
//! a bridge `cni0` holding the gateway 10.77.k.1/24, the pods get 10.77.k.N/24); the fixture's
//! pods below are plugged in by hand, with the same addresses.
//!
//! ```text
//!  fabric netns: bridge br0 (10.77.0.0/24 between nodes; optionally 10.77.0.1 on the bridge)
//!    |-- n1 <veth> eth0 [node 1: 10.77.0.11, ip_forward] p0 <veth> eth0 [pod: 10.77.1.2/32]
//!    |                                                    p1 <veth> eth0 [pod: 10.77.1.3/32]
//!    '-- n2 <veth> eth0 [node 2: 10.77.0.12, ip_forward] p0 <veth> eth0 [pod: 10.77.2.2/32]
//! ```
//!
//! Every node and pod is dual-stack: the IPv6 plan mirrors the IPv4 one digit for digit in the
//! ULA prefix fd77::/48 (10.77.0.11 is fd77::11/64 on the fabric, pod 10.77.1.2 is
//! fd77:1::2/128, its gateway fd77:1::1, node k's pods fd77:k::/64). IPv6 addresses are added
//! with `nodad`: duplicate address detection would keep them unusable for a second or more
//! after creation, and the plan guarantees they are unique.
//!
//! Interfaces are created directly inside the namespaces, so their short names (`eth0`, `p0`,
//! `n1`) never meet in the host's namespace: nothing here touches the root namespace's links,
//! routes or iptables. We drive `ip` (iproute2) rather than netlink: the commands are what an
//! operator would type to inspect or repair the same state, and errors quote them.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// Where `ip netns add` puts namespace files.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Why a piece of plumbing could not be made or inspected.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A program could not be started at all (missing iproute2?).
    #[error("cannot run {program} (is it installed? iproute2 provides ip)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `setns` into a namespace failed.
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: String,
        #[source]
        source: nix::Error,
    },
    /// The helper thread could not be spawned.
    #[error("cannot spawn a thread to enter {ns}")]
    Thread {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    /// An index does not fit the 10.77.k.N address plan.
    #[error("{what} {n} does not fit the address plan (at most 249)")]
    Plan { what: &'static str, n: usize },
}

/// Runs a host command; returns stdout, or an error with the command line and stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` (program and arguments) inside namespace `ns` (`ip netns exec`).
pub fn exec_in(ns: &str, cmd: &[&str]) -> Result<String, NetError> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(cmd);
    run("ip", &full)
}

/// `ip -n <netns> <args>`.
pub fn ip(ns: &str, args: &[&str]) -> Result<String, NetError> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result. Sockets created by
/// `f` stay in `ns` wherever they are used afterwards; the caller's threads never move, so a
/// runtime thread can never be left stranded in a namespace. A panic in `f` is re-raised here.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T, NetError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let path = format!("{NETNS_RUN_DIR}/{ns}");
    let file = File::open(&path).map_err(|source| NetError::Open {
        path: path.clone(),
        source,
    })?;
    let handle = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || -> Result<T, NetError> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetError::Enter { path, source })?;
            Ok(f())
        })
        .map_err(|source| NetError::Thread {
            ns: ns.to_owned(),
            source,
        })?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Creates namespace `name` with its loopback up. A namespace of that name left over from a
/// killed run is deleted first, so a rerun starts clean.
pub fn add_netns(name: &str) -> Result<(), NetError> {
    if list_netns()?.iter().any(|n| n == name) {
        del_netns(name)?;
    }
    run("ip", &["netns", "add", name])?;
    ip(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes namespace `name`; its links (and the veth peers in other namespaces), addresses,
/// routes and iptables rules go with it.
pub fn del_netns(name: &str) -> Result<(), NetError> {
    run("ip", &["netns", "del", name]).map(drop)
}

/// The names of every namespace under [`NETNS_RUN_DIR`].
pub fn list_netns() -> Result<Vec<String>, NetError> {
    let out = run("ip", &["netns", "list"])?;
    // Lines look like `name` or `name (id: 3)`.
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The pids of every process whose network namespace is `name`.
pub fn netns_pids(name: &str) -> Result<Vec<i32>, NetError> {
    let out = run("ip", &["netns", "pids", name])?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Node k's (1-based) address on the fabric: 10.77.0.(10+k).
pub fn node_ip(k: usize) -> Result<Ipv4Addr, NetError> {
    Ok(Ipv4Addr::new(10, 77, 0, 10 + octet("node", k)?))
}

/// The gateway pods of node k use: 10.77.k.1, on every node-side pod veth.
pub fn pod_gateway(k: usize) -> Result<Ipv4Addr, NetError> {
    Ok(Ipv4Addr::new(10, 77, octet("node", k)?, 1))
}

/// Pod j's (0-based, per node) address on node k: 10.77.k.(j+2).
pub fn pod_ip(k: usize, j: usize) -> Result<Ipv4Addr, NetError> {
    Ok(Ipv4Addr::new(
        10,
        77,
        octet("node", k)?,
        octet("pod", j + 2)?,
    ))
}

/// The IPv6 twin of an IPv4 plan number: its decimal digits read as hex, so that 10.77.1.12
/// becomes fd77:1::12 and the two plans can be read side by side.
fn mirror(what: &'static str, n: usize) -> Result<u16, NetError> {
    let n = octet(what, n)?;
    // Up to three decimal digits always parse as hex and fit in 16 bits.
    u16::from_str_radix(&n.to_string(), 16).map_err(|_| NetError::Plan {
        what,
        n: usize::from(n),
    })
}

/// Node k's IPv6 address on the fabric: fd77::(10+k), in a /64.
pub fn node_ip6(k: usize) -> Result<Ipv6Addr, NetError> {
    let host = mirror("node", 10 + k)?;
    Ok(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, host))
}

/// The IPv6 gateway of node k's pods: fd77:k::1.
pub fn pod_gateway6(k: usize) -> Result<Ipv6Addr, NetError> {
    Ok(Ipv6Addr::new(0xfd77, mirror("node", k)?, 0, 0, 0, 0, 0, 1))
}

/// Pod j's (0-based, per node) IPv6 address on node k: fd77:k::(j+2).
pub fn pod_ip6(k: usize, j: usize) -> Result<Ipv6Addr, NetError> {
    Ok(Ipv6Addr::new(
        0xfd77,
        mirror("node", k)?,
        0,
        0,
        0,
        0,
        0,
        mirror("pod", j + 2)?,
    ))
}

/// The last per-node pod index of the plan: pod 247 is 10.77.k.249.
pub const MAX_POD_INDEX: usize = 247;

/// Node k's pod subnet, 10.77.k.0/24.
pub fn pod_subnet(k: usize) -> Result<String, NetError> {
    Ok(format!("10.77.{}.0/24", octet("node", k)?))
}

/// Node k's IPv6 pod subnet, fd77:k::/64.
pub fn pod_subnet6(k: usize) -> Result<String, NetError> {
    Ok(format!("fd77:{:x}::/64", mirror("node", k)?))
}

/// The IPv6 address the fabric's bridge carries with [`FABRIC_IP`].
pub const FABRIC_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);

/// The address the fabric's bridge may carry (where a controller listens for the nodes).
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn octet(what: &'static str, n: usize) -> Result<u8, NetError> {
    u8::try_from(n)
        .ok()
        .filter(|o| *o < 250)
        .ok_or(NetError::Plan { what, n })
}

/// Makes bridge `br0` in the (existing) fabric namespace, with [`FABRIC_IP`] on it when
/// `with_address` (so processes in the fabric, such as the controller, are reachable from nodes).
pub fn make_fabric_bridge(fabric: &str, with_address: bool) -> Result<(), NetError> {
    ip(fabric, &["link", "add", "br0", "type", "bridge"])?;
    if with_address {
        ip(
            fabric,
            &["addr", "add", &format!("{FABRIC_IP}/24"), "dev", "br0"],
        )?;
        ip(
            fabric,
            &[
                "addr",
                "add",
                &format!("{FABRIC_IP6}/64"),
                "dev",
                "br0",
                "nodad",
            ],
        )?;
    }
    ip(fabric, &["link", "set", "br0", "up"])?;
    Ok(())
}

/// Plugs node k (1-based; its namespace exists) into the fabric bridge: veth `n<k>` on the
/// bridge, `eth0` with [`node_ip`] in the node, forwarding on. Returns the node's address.
pub fn attach_node(fabric: &str, node: &str, k: usize) -> Result<Ipv4Addr, NetError> {
    // Nodes route between pods; rp_filter would drop asymmetric paths in between.
    exec_in(
        node,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.forwarding=1",
        ],
    )?;
    let uplink = format!("n{k}");
    ip(
        fabric,
        &[
            "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", node,
        ],
    )?;
    ip(fabric, &["link", "set", &uplink, "master", "br0", "up"])?;
    let node_ip = node_ip(k)?;
    ip(
        node,
        &["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"],
    )?;
    ip(
        node,
        &[
            "addr",
            "add",
            &format!("{}/64", node_ip6(k)?),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip(node, &["link", "set", "eth0", "up"])?;
    Ok(node_ip)
}

/// Routes every node's pod subnets (10.77.m.0/24, fd77:m::/64) from every other node, via
/// that node.
/// `nodes` holds (namespace, 1-based index) pairs.
pub fn route_between_nodes(nodes: &[(&str, usize)]) -> Result<(), NetError> {
    for (ns, k) in nodes {
        for (_, m) in nodes {
            if k != m {
                let subnet = pod_subnet(*m)?;
                ip(
                    ns,
                    &["route", "add", &subnet, "via", &node_ip(*m)?.to_string()],
                )?;
                ip(
                    ns,
                    &[
                        "-6",
                        "route",
                        "add",
                        &pod_subnet6(*m)?,
                        "via",
                        &node_ip6(*m)?.to_string(),
                    ],
                )?;
            }
        }
    }
    Ok(())
}

/// Routes from the fabric (where the controller listens) to every node's pods, so pods
/// that talk to the control plane themselves, as waypoints do, reach it and get answers.
pub fn route_fabric_to_pods(fabric: &str, nodes: &[(&str, usize)]) -> Result<(), NetError> {
    for (_, k) in nodes {
        let subnet = pod_subnet(*k)?;
        ip(
            fabric,
            &["route", "add", &subnet, "via", &node_ip(*k)?.to_string()],
        )?;
        ip(
            fabric,
            &[
                "-6",
                "route",
                "add",
                &pod_subnet6(*k)?,
                "via",
                &node_ip6(*k)?.to_string(),
            ],
        )?;
    }
    Ok(())
}

/// Makes a pod's namespace as a container runtime makes a sandbox, before any CNI call:
/// loopback up and strict reverse-path filtering (see [`attach_pod`]); the CNI chain then
/// gives it `eth0`, its addresses and routes.
pub fn add_sandbox(pod: &str) -> Result<(), NetError> {
    add_netns(pod)?;
    exec_in(
        pod,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.all.rp_filter=1",
            "net.ipv4.conf.default.rp_filter=1",
        ],
    )
    .map(drop)
}

/// Prepares node namespace `node` to host pods made by the CNI `bridge` plugin: no duplicate
/// address detection on the interfaces it will create (the bridge's gateway addresses would
/// stay unusable for a second or more after the first pod arrives; the plan guarantees they
/// are unique).
pub fn prepare_cni_host(node: &str) -> Result<(), NetError> {
    exec_in(
        node,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )
    .map(drop)
}

/// Plugs pod j (0-based on its node; its namespace exists) into node k: veth `p<j>` in the
/// node with the gateway addresses and a /32 and a /128 route, `eth0` with [`pod_ip`] and
/// [`pod_ip6`] in the pod and a default route of each family via the gateway. Pods use strict reverse-path filtering, as many
/// distributions set it: the harder case for ztunnel's transparent dials from a client IP
/// that is not local to the pod. Returns the pod's address.
pub fn attach_pod(node: &str, k: usize, pod: &str, j: usize) -> Result<Ipv4Addr, NetError> {
    let gateway = pod_gateway(k)?.to_string();
    let pod_ip = pod_ip(k, j)?;
    exec_in(
        pod,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.all.rp_filter=1",
            "net.ipv4.conf.default.rp_filter=1",
        ],
    )?;
    let host_side = format!("p{j}");
    ip(
        node,
        &[
            "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", pod,
        ],
    )?;
    ip(
        node,
        &["addr", "add", &format!("{gateway}/32"), "dev", &host_side],
    )?;
    let gateway6 = pod_gateway6(k)?.to_string();
    let pod_ip6 = pod_ip6(k, j)?;
    ip(
        node,
        &[
            "addr",
            "add",
            &format!("{gateway6}/128"),
            "dev",
            &host_side,
            "nodad",
        ],
    )?;
    ip(node, &["link", "set", &host_side, "up"])?;
    ip(
        node,
        &["route", "add", &format!("{pod_ip}/32"), "dev", &host_side],
    )?;
    ip(
        node,
        &[
            "-6",
            "route",
            "add",
            &format!("{pod_ip6}/128"),
            "dev",
            &host_side,
        ],
    )?;
    ip(
        pod,
        &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"],
    )?;
    ip(
        pod,
        &[
            "addr",
            "add",
            &format!("{pod_ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip(pod, &["link", "set", "eth0", "up"])?;
    ip(pod, &["route", "add", &gateway, "dev", "eth0"])?;
    ip(
        pod,
        &["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )?;
    ip(pod, &["-6", "route", "add", &gateway6, "dev", "eth0"])?;
    ip(
        pod,
        &[
            "-6", "route", "add", "default", "via", &gateway6, "dev", "eth0",
        ],
    )?;
    Ok(pod_ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_plan() {
        assert_eq!(node_ip(1).unwrap(), Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!(pod_gateway(2).unwrap(), Ipv4Addr::new(10, 77, 2, 1));
        assert_eq!(pod_ip(2, 0).unwrap(), Ipv4Addr::new(10, 77, 2, 2));
        assert_eq!(
            node_ip6(1).unwrap(),
            "fd77::11".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            pod_gateway6(2).unwrap(),
            "fd77:2::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            pod_ip6(2, 10).unwrap(),
            "fd77:2::12".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(pod_subnet6(3).unwrap(), "fd77:3::/64");
        assert_eq!(pod_subnet(3).unwrap(), "10.77.3.0/24");
        assert_eq!(
            pod_ip(1, MAX_POD_INDEX).unwrap(),
            Ipv4Addr::new(10, 77, 1, 249)
        );
        assert!(matches!(
            pod_ip(1, 248),
            Err(NetError::Plan { what: "pod", .. })
        ));
    }
}
