//! Test support other crates' tests can use too (behind the `testing` feature): a fake
//! Kubernetes API server that speaks the real wire format, so the controller's Kubernetes source,
//! the manifests and end-to-end tests run a real kube-rs client without a cluster.

pub mod apiserver;
