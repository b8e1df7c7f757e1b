//! The numbers and names every component agrees on: the well-known ports and the default
//! trust domain. They live here, beside the wire contract, because this is the lowest crate
//! every component (and the manifests) depends on; each user converts to the integer type
//! its API wants (`u32` in the protobuf, `i32` in Kubernetes objects).

/// The SPIFFE trust domain of workload identities unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The ports of the root `ARCHITECTURE.md` ("Ports").
pub mod ports {
    /// ztunnel, in each pod's network namespace: outbound capture.
    pub const OUTBOUND: u16 = 15001;
    /// ztunnel, in each pod's network namespace: inbound plaintext capture.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound HBONE (ztunnel in each pod's network namespace, and waypoints).
    pub const HBONE: u16 = 15008;
    /// ztunnel, in each pod's network namespace: DNS capture.
    pub const DNS: u16 = 15053;
    /// Admin of every proxy, loopback only: never exposed by a Service or containerPort.
    pub const ADMIN: u16 = 15000;
    /// Prometheus metrics of every proxy.
    pub const METRICS: u16 = 15020;
    /// Readiness of every proxy.
    pub const READINESS: u16 = 15021;
    /// Controller: discovery and CA (gRPC over TLS).
    pub const DISCOVERY: u16 = 15012;
    /// Controller: metrics, readiness and dashboard.
    pub const CONTROLLER_OPS: u16 = 15014;
}
