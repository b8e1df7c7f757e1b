//! `ambit-cni`: a chained CNI plugin (CNI spec 1.0) that captures a pod in Ambit's mesh before
//! its containers start, and the installer that puts it on a node.
//!
//! Listed last in the node's network configuration list, after the plugins that give the pod
//! its interface and addresses, it asks ztunnel (over `cni.sock` in ztunnel's node directory)
//! whether the pod is in the mesh, installs the very capture rules ztunnel would install
//! (ztunnel's own `capture::iptables` code) in the pod's namespace, and tells ztunnel, which
//! adopts the pod at once. A pod in the mesh is therefore never reachable, nor able to reach
//! anything, outside the mesh: until ztunnel serves it, its connections are refused.
//!
//! - [`spec`]: the CNI environment, configuration, errors and VERSION, as the spec defines them.
//! - [`plugin`]: ADD, DEL, CHECK.
//! - [`client`]: the `cni.sock` exchange, and the kept-state verdict when ztunnel is away.
//! - [`install`]: copying the binary and editing the node's conflist.
//!
//! Not for: deciding policy or carrying traffic (ztunnel's), talking to Kubernetes (the
//! controller's). See `cni/ARCHITECTURE.md`.

pub mod client;
pub mod install;
pub mod plugin;
pub mod spec;
