//! `PeerAuthentication` in `security.ambit.dev/v1`: Istio's schema for the mTLS mode of
//! workloads, so operators can bring the policies they already have.
//!
//! Modes are typed (a misspelt mode is refused where the document is read, naming the
//! field); ports stay strings as Kubernetes carries map keys, and [`PeerAuthenticationSpec::check`]
//! holds the rules the types cannot: ports are 1-65535, and `portLevelMtls` needs a
//! selector (as Istio validates it). Every source and `ambitctl apply` run that check, so
//! a bad object is refused with its file, document and field.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::security::WorkloadSelector;

/// The mTLS mode of the selected workloads (or of the namespace, or of the mesh when it
/// lives in the root namespace).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.ambit.dev",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    shortname = "pa",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads (pods) of the policy's namespace it applies to, by labels. Without it the
    /// policy applies to the whole namespace (to the whole mesh in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode for every port of the selected workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Modes by the workload's own (target) port, e.g. `"8080": {mode: PERMISSIVE}`; they
    /// win over `mtls`. Only with a `selector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

/// An mTLS setting.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Mtls {
    /// Defaults to UNSET (inherit).
    #[serde(default)]
    pub mode: Mode,
}

/// Istio's mTLS modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// Inherit from the enclosing level (port, workload, namespace, mesh); past the mesh,
    /// ztunnel's own default (`--strict-inbound`, else PERMISSIVE).
    #[default]
    Unset,
    /// Plaintext accepted (as PERMISSIVE, for inbound).
    Disable,
    /// Plaintext and mTLS accepted.
    Permissive,
    /// Only mTLS: ztunnel refuses inbound plaintext.
    Strict,
}

/// A field that breaks a rule the types cannot express, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct InvalidField {
    /// Path of the field, e.g. `spec.portLevelMtls[70000]`.
    pub field: String,
    /// What is wrong with it.
    pub why: String,
}

impl PeerAuthenticationSpec {
    /// The selector's labels, `None` when there is none (or it is empty, which Kubernetes
    /// reads as "everything" and Istio as namespace-wide).
    pub fn selector_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.selector
            .as_ref()
            .map(|s| &s.match_labels)
            .filter(|l| !l.is_empty())
    }

    /// The ports of `portLevelMtls`, parsed, or the first field that is wrong.
    pub fn check(&self) -> Result<BTreeMap<u16, Mode>, InvalidField> {
        let mut out = BTreeMap::new();
        for (key, m) in &self.port_level_mtls {
            let field = format!("spec.portLevelMtls[{key}]");
            match key.trim().parse::<u16>() {
                Ok(p) if p > 0 => {
                    out.insert(p, m.mode);
                }
                _ => {
                    return Err(InvalidField {
                        field,
                        why: format!("{key:?} is not a port number (1-65535)"),
                    })
                }
            }
        }
        if !out.is_empty() && self.selector_labels().is_none() {
            return Err(InvalidField {
                field: "spec.portLevelMtls".into(),
                why: "port-level modes need a selector (as in Istio); a namespace or mesh \
                      policy sets one mode for every port"
                    .into(),
            });
        }
        Ok(out)
    }
}
