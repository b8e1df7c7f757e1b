//! In-pod traffic capture: ztunnel enters each enrolled pod's network namespace, installs
//! iptables rules there that steer the pod's TCP traffic to ztunnel's ports, and opens those
//! listeners inside the namespace (the root ARCHITECTURE.md, "Wire formats").
//!
//! - [`netns`]: finding a pod's namespace by IP; a worker thread that lives inside it.
//! - [`iptables`]: the rules as an `iptables-restore` document, applied and removed atomically.
//! - [`sockets`]: the listeners and ztunnel's own (marked, possibly transparent) sockets.
//! - [`inpod`]: one pod's capture ([`CapturedPod`]), the per-node [`CaptureManager`], and
//!   [`dedicated`] mode for a workload outside Kubernetes.
//! - [`sweep`]: once at start, the rules of pods that left the mesh while no ztunnel ran.
//!
//! Threads and ports, per enrolled pod: one namespace worker thread (socket creation and
//! `iptables-restore` only; all I/O stays on the main runtime), and three listeners per
//! family inside the pod: 127.0.0.1:15001 and [::1]:15001 (outbound, REDIRECT),
//! 0.0.0.0:15006 and [::]:15006 (inbound plaintext, TPROXY, IP_TRANSPARENT), 0.0.0.0:15008
//! and [::]:15008 (HBONE, not redirected); the IPv6 ones are IPV6_V6ONLY. With the DNS proxy,
//! UDP and TCP on 127.0.0.1:15053 and [::1]:15053 take the pod's DNS (REDIRECT from port 53). ztunnel's own
//! sockets in the pod carry SO_MARK 0x539 (mask 0xfff). A pod's IPv6 is captured with
//! `ip6tables` exactly as its IPv4 with `iptables`; where it cannot be meshed (the mesh knows
//! no IPv6 address of the pod, its IPv6 listeners cannot open) it is closed instead: every
//! IPv6 packet but loopback and link-level ICMPv6 is dropped. Either way a dual-stack pod
//! cannot leave the mesh through IPv6.
//!
//! This module only moves packets to ztunnel; deciding what to do with a connection is the
//! proxy's job. No `unsafe` is needed: `setns` and every socket option have safe wrappers (nix,
//! socket2), and commands inherit the namespace of the thread that spawns them.

pub mod inpod;
pub mod iptables;
pub mod netns;
pub mod sockets;
pub mod sweep;

pub use inpod::{
    dedicated, dedicated_with, CaptureConfig, CaptureManager, CapturedPod, InpodError,
    Ipv6Listeners, PodListeners,
};
pub use iptables::{Backend, Ipv6Capture, RuleConfig};
pub use netns::{NetnsHandle, NetnsWorker};
pub use sockets::{original_dst, SocketFactory};
