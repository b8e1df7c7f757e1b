//! What ztunnel knows about the mesh: workloads, services, authorization policies and
//! peer authentications (mTLS modes).
//!
//! The controller speaks protobuf ([`ambit_proto::discovery`]); everything past this module's
//! edge speaks the domain types defined here, converted once with `TryFrom` when a push
//! arrives. A conversion error names the resource and the field, so that the NACK sent back
//! to the controller (and the controller's log) says exactly what was wrong.
//!
//! - [`workload`]: pods (and waypoints) with their identity, addresses and tunnel protocol.
//! - [`service`]: services with their VIPs, ports and endpoints.
//! - [`external`]: destinations outside the mesh declared to it, and the outbound policy.
//! - [`policy`]: which authorization policies apply to a connection, evaluated by the
//!   shared engine ([`ambit_policy`]) at L4.
//! - [`store`]: the indexed, atomically updated state, one writer and many cheap readers.
//! - [`static_file`]: the same state read from a YAML file (tests, running without a controller).
//!
//! Everything here is `Serialize` so that the admin endpoint can dump the configuration as
//! ztunnel sees it.

pub mod external;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod gateway;
pub mod policy;
pub mod service;
pub mod static_file;
pub mod store;
pub mod workload;

use std::net::IpAddr;

// The policy types are the shared engine's: the store holds them, `policy` evaluates them.
pub use ambit_policy::{
    parse_ip_net, Action, MtlsMode, PeerAuthentication, Policy as Authorization,
    Scope as PolicyScope, StringMatch,
};
pub use external::{ExternalService, OutboundPolicy};
pub use policy::{ConnectionInfo, Verdict};
pub use service::{Endpoint, LoadBalancing, Service, ServicePort};
pub use store::{ApplyOutcome, LocalWorkloads, State, StateReader, Store, StoreError};
pub use workload::{GatewayAddress, TunnelProtocol, Workload};

/// Why a resource received from the controller (or read from a static file) could not be
/// turned into ztunnel's domain types. The message always names the resource first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A field that must be set is empty.
    #[error("{resource}: {field} is empty")]
    Missing {
        resource: String,
        field: &'static str,
    },
    /// A raw address is neither 4 (IPv4) nor 16 (IPv6) bytes long.
    #[error("{resource}: {field} is {len} bytes, not an IPv4 or IPv6 address")]
    Address {
        resource: String,
        field: String,
        len: usize,
    },
    /// A field holds a value outside its domain (a port above 65535, an unknown enum value,
    /// a malformed name...).
    #[error("{resource}: {field} {value:?} is invalid: {why}")]
    Invalid {
        resource: String,
        field: String,
        value: String,
        why: String,
    },
    /// A push carried a resource with no kind set (an empty `oneof`).
    #[error("resource {index} of the push has no kind")]
    EmptyResource { index: usize },
    /// A removal named a resource kind ztunnel does not know.
    #[error("removal {index} ({name:?}) has unknown kind {kind}")]
    UnknownRemovalKind {
        index: usize,
        name: String,
        kind: i32,
    },
    /// Two resources of one push share a key: the push is ambiguous.
    #[error("{kind} {key:?} appears twice in the push")]
    Duplicate { kind: &'static str, key: String },
    /// An authorization policy or a peer authentication does not decode (the shared engine
    /// names the field).
    #[error(transparent)]
    Policy(#[from] ambit_policy::WireError),
}

/// Parses a raw protobuf address (4 or 16 bytes).
pub(crate) fn ip_from_bytes(
    resource: &dyn Fn() -> String,
    field: &dyn Fn() -> String,
    bytes: &[u8],
) -> Result<IpAddr, ConvertError> {
    ambit_proto::ip_from_bytes(bytes).map_err(|len| ConvertError::Address {
        resource: resource(),
        field: field(),
        len,
    })
}

/// Turns an IP into the raw bytes the protobuf contract carries (for the static file source and
/// tests).
pub(crate) fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Checks a protobuf `uint32` port. `zero_ok` is for fields where 0 means "unset".
pub(crate) fn port_from_u32(
    resource: &dyn Fn() -> String,
    field: &dyn Fn() -> String,
    port: u32,
    zero_ok: bool,
) -> Result<u16, ConvertError> {
    match u16::try_from(port) {
        Ok(0) if !zero_ok => Err(ConvertError::Invalid {
            resource: resource(),
            field: field(),
            value: port.to_string(),
            why: "port 0 is not a port".into(),
        }),
        Ok(p) => Ok(p),
        Err(_) => Err(ConvertError::Invalid {
            resource: resource(),
            field: field(),
            value: port.to_string(),
            why: "ports stop at 65535".into(),
        }),
    }
}
