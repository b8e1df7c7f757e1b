//! In-pod traffic capture: ztunnel enters each enrolled pod's network namespace, installs
//! iptables rules there that steer the pod's TCP traffic to ztunnel's ports, and opens those
//! listeners inside the namespace (DESIGN.md, "Traffic capture").
//!
//! - [`netns`]: finding a pod's namespace by IP; a worker thread that lives inside it.
//! - [`iptables`]: the rules as an `iptables-restore` document, applied and removed atomically.
//! - [`sockets`]: the listeners and ztunnel's own (marked, possibly transparent) sockets.
//! - [`inpod`]: one pod's capture ([`CapturedPod`]), the per-node [`CaptureManager`], and
//!   [`dedicated`] mode for a workload outside Kubernetes.
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
