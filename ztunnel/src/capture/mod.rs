//! In-pod traffic capture: ztunnel enters each enrolled pod's network namespace, installs
//! iptables rules there that steer the pod's TCP traffic to ztunnel's ports, and opens those
//! listeners inside the namespace (the root ARCHITECTURE.md, "Wire formats").
//!
//! - [`netns`]: finding a pod's namespace by IP; a worker thread that lives inside it.
//! - [`iptables`]: the rules as an `iptables-restore` document, applied and removed atomically.
//! - [`sockets`]: the listeners and ztunnel's own (marked, possibly transparent) sockets.
//! - [`inpod`]: one pod's capture ([`CapturedPod`]), the per-node [`CaptureManager`], and
//!   [`dedicated`] mode for a workload outside Kubernetes.
//!
//! Threads and ports, per enrolled pod: one namespace worker thread (socket creation and
//! `iptables-restore` only; all I/O stays on the main runtime), and three listeners inside the
//! pod: 127.0.0.1:15001 (outbound, REDIRECT), 0.0.0.0:15006 (inbound plaintext, TPROXY,
//! IP_TRANSPARENT), 0.0.0.0:15008 (HBONE, not redirected). ztunnel's own sockets in the pod
//! carry SO_MARK 0x539 (mask 0xfff). IPv4 only for now: IPv6 is not captured but closed
//! (`ip6tables` rules beside the IPv4 ones drop every IPv6 packet of an enrolled pod except
//! loopback and link-level ICMPv6), so a dual-stack pod cannot leave the mesh through it.
//!
//! This module only moves packets to ztunnel; deciding what to do with a connection is the
//! proxy's job. No `unsafe` is needed: `setns` and every socket option have safe wrappers (nix,
//! socket2), and commands inherit the namespace of the thread that spawns them.

pub mod inpod;
pub mod iptables;
pub mod netns;
pub mod sockets;

pub use inpod::{dedicated, CaptureConfig, CaptureManager, CapturedPod, InpodError, PodListeners};
pub use iptables::{Backend, RuleConfig};
pub use netns::{NetnsHandle, NetnsWorker};
pub use sockets::{original_dst, SocketFactory};
