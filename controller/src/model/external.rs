//! Conversion of `ExternalService` to its wire form for ztunnels, and the namespaces'
//! outbound policy label.
//!
//! Every field is checked by [`ExternalServiceSpec::check`](crate::crd::external::ExternalServiceSpec::check),
//! by the local source before the object is taken (file, document, field) and here for the
//! Kubernetes source, so a ztunnel never receives one it would have to refuse.

use std::collections::BTreeMap;

use ambit_proto::discovery::{
    ExternalEndpoint, ExternalPort, ExternalResolution, ExternalService as Wire, IpBlock,
    OutboundPolicy,
};

use super::derive::ip_bytes;
use super::{typed, FieldError, Kind, ModelError, Store};
use crate::crd::external::{ExternalServiceSpec, Resolution};
use crate::crd::peer_auth::InvalidField;

/// Namespace label choosing what its workloads may reach outside the mesh: `ALLOW_ANY`
/// (the default) or `REGISTRY_ONLY` (mesh destinations and ExternalServices only).
pub const OUTBOUND_POLICY_LABEL: &str = "ambit.dev/outbound-policy";

/// The outbound policy a namespace's labels set, or why the label is wrong.
pub fn outbound_policy(
    labels: Option<&BTreeMap<String, String>>,
) -> Result<OutboundPolicy, InvalidField> {
    match labels
        .and_then(|l| l.get(OUTBOUND_POLICY_LABEL))
        .map(String::as_str)
    {
        None | Some("ALLOW_ANY") => Ok(OutboundPolicy::AllowAny),
        Some("REGISTRY_ONLY") => Ok(OutboundPolicy::RegistryOnly),
        Some(other) => Err(InvalidField {
            field: format!("metadata.labels[{OUTBOUND_POLICY_LABEL}]"),
            why: format!("{other:?} is not ALLOW_ANY or REGISTRY_ONLY"),
        }),
    }
}

/// Converts one spec, or names the field that is wrong.
pub(super) fn convert(
    spec: &ExternalServiceSpec,
    namespace: &str,
    name: &str,
) -> Result<Wire, (String, FieldError)> {
    let checked = spec
        .check()
        .map_err(|e| (e.field, FieldError::Invalid(e.why)))?;
    Ok(Wire {
        name: name.into(),
        namespace: namespace.into(),
        hosts: spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        addresses: checked
            .addresses
            .iter()
            .map(|n| IpBlock {
                address: ip_bytes(n.addr()),
                prefix_len: u32::from(n.prefix_len()),
            })
            .collect(),
        // `check` bounded the numbers to 1-65535.
        ports: spec
            .ports
            .iter()
            .map(|p| ExternalPort {
                number: p.number,
                name: p.name.clone(),
                protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase(),
                target_port: p.target_port.unwrap_or(0),
            })
            .collect(),
        resolution: match spec.resolution {
            Resolution::None => ExternalResolution::None,
            Resolution::Static => ExternalResolution::Static,
            Resolution::Dns => ExternalResolution::Dns,
        } as i32,
        endpoints: spec
            .endpoints
            .iter()
            .map(|e| ExternalEndpoint {
                address: e.address.clone(),
                ports: e.ports.clone().into_iter().collect(),
            })
            .collect(),
    })
}

/// Converts every `ExternalService`; invalid ones are reported and left out (a source that
/// reads files refuses them earlier, keeping the file's last good objects).
pub(super) fn external_services(store: &Store, errors: &mut Vec<ModelError>) -> Vec<Wire> {
    let mut out = Vec::new();
    for x in typed!(store, ExternalService) {
        let Some(name) = x.metadata.name.clone() else {
            continue;
        };
        let namespace = x
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| super::DEFAULT_NAMESPACE.into());
        match convert(&x.spec, &namespace, &name) {
            Ok(w) => out.push(w),
            Err((field, reason)) => errors.push(ModelError::Rejected {
                kind: Kind::ExternalService,
                namespace,
                name,
                field,
                reason,
            }),
        }
    }
    out
}
