//! Conversion of `PeerAuthentication` to the shared engine's
//! [`ambit_policy::PeerAuthentication`] (its wire form is the engine's too).
//!
//! Placement is decided here, once: no selector in the root namespace is the mesh level
//! (`Global`), no selector elsewhere the namespace level, a selector the workload level
//! (selecting in its own namespace only). Which policy wins for a connection is the
//! engine's business on the proxy, from the labels the workloads carry.

use ambit_policy::{MtlsMode, PeerAuthentication as Engine, Scope};

use super::{typed, FieldError, Kind, ModelConfig, ModelError, Store};
use crate::crd::peer_auth::{Mode, PeerAuthenticationSpec};

fn mode(m: Mode) -> MtlsMode {
    match m {
        Mode::Unset => MtlsMode::Unset,
        Mode::Disable => MtlsMode::Disable,
        Mode::Permissive => MtlsMode::Permissive,
        Mode::Strict => MtlsMode::Strict,
    }
}

/// Converts one spec, or names the field that is wrong.
pub(super) fn convert(
    spec: &PeerAuthenticationSpec,
    namespace: &str,
    name: &str,
    config: &ModelConfig,
) -> Result<Engine, (String, FieldError)> {
    let ports = spec
        .check()
        .map_err(|e| (e.field, FieldError::Invalid(e.why)))?;
    let selector = spec.selector_labels();
    let scope = match selector {
        Some(_) => Scope::WorkloadSelector,
        None if namespace == config.root_namespace => Scope::Global,
        None => Scope::Namespace,
    };
    Ok(Engine {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        selector: selector
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
            .collect(),
        mode: mode(spec.mtls.map(|m| m.mode).unwrap_or_default()),
        port_level_mtls: ports.into_iter().map(|(p, m)| (p, mode(m))).collect(),
    })
}

/// Converts every `PeerAuthentication`; invalid ones are reported and left out (a source
/// that reads files refuses them earlier, keeping the file's last good objects).
pub(super) fn peer_authentications(
    store: &Store,
    config: &ModelConfig,
    errors: &mut Vec<ModelError>,
) -> Vec<Engine> {
    let mut out = Vec::new();
    for pa in typed!(store, PeerAuthentication) {
        let Some(name) = pa.metadata.name.clone() else {
            continue;
        };
        let namespace = pa
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| super::DEFAULT_NAMESPACE.into());
        match convert(&pa.spec, &namespace, &name, config) {
            Ok(p) => out.push(p),
            Err((field, reason)) => errors.push(ModelError::Rejected {
                kind: Kind::PeerAuthentication,
                namespace,
                name,
                field,
                reason,
            }),
        }
    }
    out
}
