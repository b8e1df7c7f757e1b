//! Istio's `PeerAuthentication`: which mTLS mode a workload's port is in, so whether
//! inbound plaintext may reach it.
//!
//! Four levels, the narrowest set one winning: the port (`portLevelMtls` of a policy
//! selecting the workload), the workload (a policy selecting it by labels), its namespace
//! (a policy without selector), the mesh (a policy without selector in the root
//! namespace). `UNSET` at a level inherits from the next wider one; past the mesh, the
//! proxy's own default decides (ztunnel's `--strict-inbound`). `DISABLE` accepts
//! plaintext as `PERMISSIVE` does: an ambient mesh does not turn its tunnel off per
//! destination, and inbound is the only place this is enforced.
//!
//! When several policies apply at one level, Istio takes the oldest; the discovery
//! protocol carries no creation time, so here the first by `namespace/name` decides
//! (deterministic on every node).
//!
//! [`effective_mode`] is a pure function of the policies a proxy holds and the
//! connection's destination, so every precedence rule is a table test below.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use ambit_proto::discovery as pb;
use serde::{Deserialize, Serialize};

use crate::model::Scope;
use crate::wire::WireError;

/// An mTLS mode, as Istio spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the enclosing level.
    #[default]
    Unset,
    /// Plaintext accepted (the same as PERMISSIVE for inbound).
    Disable,
    /// Plaintext and mTLS accepted.
    Permissive,
    /// Only mTLS: plaintext refused.
    Strict,
}

impl MtlsMode {
    /// Whether a plaintext connection may pass in this mode (`Unset` never reaches here
    /// from [`effective_mode`]; on its own it says nothing, so it passes).
    pub fn allows_plaintext(self) -> bool {
        self != MtlsMode::Strict
    }

    fn name(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A peer authentication policy, as every proxy holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `Global`: the mesh level; `Namespace`: its namespace; `WorkloadSelector`: the
    /// workloads of its namespace carrying every label of `selector`.
    pub scope: Scope,
    pub selector: BTreeMap<Arc<str>, Arc<str>>,
    pub mode: MtlsMode,
    /// By the workload's own (target) port; only with `WorkloadSelector`.
    pub port_level_mtls: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthentication {
    /// `namespace/name`, the key the protocol and logs use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it applies to a workload of `namespace` with `labels`. A selector only
    /// selects in its own namespace (the root namespace's too), as in Istio.
    pub fn applies_to(&self, namespace: &str, labels: &BTreeMap<Arc<str>, Arc<str>>) -> bool {
        match self.scope {
            Scope::Global => true,
            Scope::Namespace => &*self.namespace == namespace,
            Scope::WorkloadSelector => {
                &*self.namespace == namespace
                    && self
                        .selector
                        .iter()
                        .all(|(k, v)| labels.get(&**k) == Some(v))
            }
        }
    }
}

/// Which level decided a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// `portLevelMtls` of the policy selecting the workload.
    Port,
    /// The policy selecting the workload.
    Workload,
    /// The namespace's policy.
    Namespace,
    /// The mesh's policy (root namespace).
    Mesh,
    /// No policy set a mode: the proxy's default.
    Default,
}

/// The mode a connection meets and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MtlsDecision {
    /// Never `Unset`.
    pub mode: MtlsMode,
    pub level: Level,
    /// `namespace/name` of the deciding policy; `None` at [`Level::Default`].
    pub policy: Option<String>,
    /// The destination port, for the reason.
    pub port: u16,
}

impl MtlsDecision {
    /// Whether plaintext may pass.
    pub fn allows_plaintext(&self) -> bool {
        self.mode.allows_plaintext()
    }
}

/// What an access log prints: `STRICT by PeerAuthentication app/strict (namespace)`,
/// `PERMISSIVE by PeerAuthentication app/web (port 8080)`, `STRICT by the proxy's default`.
impl fmt::Display for MtlsDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.policy, self.level) {
            (Some(p), Level::Port) => write!(
                f,
                "{} by PeerAuthentication {p} (port {})",
                self.mode, self.port
            ),
            (Some(p), level) => {
                let level = match level {
                    Level::Workload => "workload",
                    Level::Namespace => "namespace",
                    _ => "mesh",
                };
                write!(f, "{} by PeerAuthentication {p} ({level})", self.mode)
            }
            (None, _) => write!(f, "{} by the proxy's default", self.mode),
        }
    }
}

/// The mode for a connection to `port` of a workload of `namespace` with `labels`, given
/// the policies the proxy holds (those that do not apply are skipped) and the proxy's
/// `default` (used when no level sets one; `Unset` there means `Permissive`).
pub fn effective_mode<'p>(
    policies: impl IntoIterator<Item = &'p PeerAuthentication>,
    namespace: &str,
    labels: &BTreeMap<Arc<str>, Arc<str>>,
    port: u16,
    default: MtlsMode,
) -> MtlsDecision {
    let mut workload: Option<&PeerAuthentication> = None;
    let mut ns: Option<&PeerAuthentication> = None;
    let mut mesh: Option<&PeerAuthentication> = None;
    for p in policies {
        if !p.applies_to(namespace, labels) {
            continue;
        }
        let slot = match p.scope {
            Scope::WorkloadSelector => &mut workload,
            Scope::Namespace => &mut ns,
            Scope::Global => &mut mesh,
        };
        // The first by key at each level, whatever order the caller holds them in.
        if slot.is_none_or(|q| (&*p.namespace, &*p.name) < (&*q.namespace, &*q.name)) {
            *slot = Some(p);
        }
    }
    let decided = |mode, level, p: &PeerAuthentication| MtlsDecision {
        mode,
        level,
        policy: Some(p.key()),
        port,
    };
    if let Some(w) = workload {
        match w.port_level_mtls.get(&port) {
            Some(&mode) if mode != MtlsMode::Unset => return decided(mode, Level::Port, w),
            _ => {}
        }
    }
    for (p, level) in [
        (workload, Level::Workload),
        (ns, Level::Namespace),
        (mesh, Level::Mesh),
    ] {
        if let Some(p) = p.filter(|p| p.mode != MtlsMode::Unset) {
            return decided(p.mode, level, p);
        }
    }
    MtlsDecision {
        mode: match default {
            MtlsMode::Unset => MtlsMode::Permissive,
            m => m,
        },
        level: Level::Default,
        policy: None,
        port,
    }
}

// ---- wire form -------------------------------------------------------------------------

fn mode_from_wire(
    resource: &dyn Fn() -> String,
    field: String,
    v: i32,
) -> Result<MtlsMode, WireError> {
    match pb::MtlsMode::try_from(v) {
        Ok(pb::MtlsMode::Unset) => Ok(MtlsMode::Unset),
        Ok(pb::MtlsMode::Disable) => Ok(MtlsMode::Disable),
        Ok(pb::MtlsMode::Permissive) => Ok(MtlsMode::Permissive),
        Ok(pb::MtlsMode::Strict) => Ok(MtlsMode::Strict),
        Err(_) => Err(WireError::Invalid {
            resource: resource(),
            field,
            value: v.to_string(),
            why: "unknown mTLS mode".into(),
        }),
    }
}

fn mode_to_wire(m: MtlsMode) -> i32 {
    (match m {
        MtlsMode::Unset => pb::MtlsMode::Unset,
        MtlsMode::Disable => pb::MtlsMode::Disable,
        MtlsMode::Permissive => pb::MtlsMode::Permissive,
        MtlsMode::Strict => pb::MtlsMode::Strict,
    }) as i32
}

impl TryFrom<pb::PeerAuthentication> for PeerAuthentication {
    type Error = WireError;

    fn try_from(p: pb::PeerAuthentication) -> Result<Self, WireError> {
        let resource = || format!("peer authentication {}/{}", p.namespace, p.name);
        let invalid = |field: String, value: String, why: &str| WireError::Invalid {
            resource: resource(),
            field,
            value,
            why: why.into(),
        };
        for (field, value) in [("name", &p.name), ("namespace", &p.namespace)] {
            if value.is_empty() {
                return Err(WireError::Missing {
                    resource: resource(),
                    field,
                });
            }
        }
        let scope = match pb::PolicyScope::try_from(p.scope) {
            Ok(pb::PolicyScope::WorkloadSelector) => Scope::WorkloadSelector,
            Ok(pb::PolicyScope::Namespace) => Scope::Namespace,
            Ok(pb::PolicyScope::Global) => Scope::Global,
            Err(_) => {
                return Err(invalid(
                    "scope".into(),
                    p.scope.to_string(),
                    "unknown value",
                ))
            }
        };
        if scope != Scope::WorkloadSelector && !p.selector.is_empty() {
            return Err(invalid(
                "selector".into(),
                format!("{:?}", p.selector),
                "only a WORKLOAD_SELECTOR policy selects",
            ));
        }
        let mode = mode_from_wire(&resource, "mode".into(), p.mode)?;
        let mut port_level_mtls = BTreeMap::new();
        for (&port, &m) in &p.port_level_mtls {
            let field = format!("port_level_mtls[{port}]");
            let port16 = match u16::try_from(port) {
                Ok(0) => return Err(invalid(field, port.to_string(), "port 0 is not a port")),
                Ok(n) => n,
                Err(_) => return Err(invalid(field, port.to_string(), "ports stop at 65535")),
            };
            if scope != Scope::WorkloadSelector {
                return Err(invalid(
                    field,
                    port.to_string(),
                    "port-level modes need a workload selector (as in Istio)",
                ));
            }
            port_level_mtls.insert(port16, mode_from_wire(&resource, field, m)?);
        }
        Ok(PeerAuthentication {
            name: p.name.as_str().into(),
            namespace: p.namespace.as_str().into(),
            scope,
            selector: p
                .selector
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            mode,
            port_level_mtls,
        })
    }
}

impl From<&PeerAuthentication> for pb::PeerAuthentication {
    fn from(p: &PeerAuthentication) -> Self {
        pb::PeerAuthentication {
            name: p.name.to_string(),
            namespace: p.namespace.to_string(),
            scope: (match p.scope {
                Scope::WorkloadSelector => pb::PolicyScope::WorkloadSelector,
                Scope::Namespace => pb::PolicyScope::Namespace,
                Scope::Global => pb::PolicyScope::Global,
            }) as i32,
            selector: p
                .selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mode: mode_to_wire(p.mode),
            port_level_mtls: p
                .port_level_mtls
                .iter()
                .map(|(&port, &m)| (u32::from(port), mode_to_wire(m)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MtlsMode::*;

    fn pa(ns: &str, name: &str, scope: Scope, mode: MtlsMode) -> PeerAuthentication {
        PeerAuthentication {
            name: name.into(),
            namespace: ns.into(),
            scope,
            mode,
            ..Default::default()
        }
    }

    fn selecting(ns: &str, name: &str, app: &str, mode: MtlsMode) -> PeerAuthentication {
        PeerAuthentication {
            selector: [("app".into(), app.into())].into(),
            ..pa(ns, name, Scope::WorkloadSelector, mode)
        }
    }

    fn ports(mut p: PeerAuthentication, ports: &[(u16, MtlsMode)]) -> PeerAuthentication {
        p.port_level_mtls = ports.iter().copied().collect();
        p
    }

    fn labels(app: &str) -> BTreeMap<Arc<str>, Arc<str>> {
        [("app".into(), app.into())].into()
    }

    /// (mode, level, deciding policy).
    type Outcome = (MtlsMode, Level, Option<String>);

    /// The outcome for app=web in namespace `app`.
    fn decide(ps: &[PeerAuthentication], port: u16, default: MtlsMode) -> Outcome {
        let d = effective_mode(ps, "app", &labels("web"), port, default);
        (d.mode, d.level, d.policy)
    }

    #[test]
    fn the_narrowest_level_that_sets_a_mode_wins() {
        let mesh = pa("ambit-system", "mesh", Scope::Global, Strict);
        let ns = pa("app", "ns", Scope::Namespace, Permissive);
        let wl = selecting("app", "wl", "web", Strict);
        let port = ports(selecting("app", "wl", "web", Strict), &[(8080, Permissive)]);
        let some = |s: &str| Some(s.to_string());
        let cases: Vec<(Vec<PeerAuthentication>, u16, MtlsMode, Outcome)> = vec![
            // Nothing: the proxy's default, PERMISSIVE unless it says otherwise.
            (vec![], 80, Unset, (Permissive, Level::Default, None)),
            (vec![], 80, Strict, (Strict, Level::Default, None)),
            // Mesh over the default, namespace over mesh, workload over namespace.
            (
                vec![mesh.clone()],
                80,
                Permissive,
                (Strict, Level::Mesh, some("ambit-system/mesh")),
            ),
            (
                vec![mesh.clone(), ns.clone()],
                80,
                Unset,
                (Permissive, Level::Namespace, some("app/ns")),
            ),
            (
                vec![mesh.clone(), ns.clone(), wl.clone()],
                80,
                Unset,
                (Strict, Level::Workload, some("app/wl")),
            ),
            // Port over workload, only on that port.
            (
                vec![mesh.clone(), ns.clone(), port.clone()],
                8080,
                Unset,
                (Permissive, Level::Port, some("app/wl")),
            ),
            (
                vec![mesh.clone(), ns.clone(), port.clone()],
                9090,
                Unset,
                (Strict, Level::Workload, some("app/wl")),
            ),
            // Order of the input does not matter.
            (
                vec![port.clone(), ns.clone(), mesh.clone()],
                8080,
                Unset,
                (Permissive, Level::Port, some("app/wl")),
            ),
        ];
        for (i, (ps, p, default, want)) in cases.into_iter().enumerate() {
            assert_eq!(decide(&ps, p, default), want, "case {i}");
        }
    }

    #[test]
    fn unset_inherits_from_the_next_wider_level() {
        let mesh = pa("ambit-system", "mesh", Scope::Global, Strict);
        let ns_unset = pa("app", "ns", Scope::Namespace, Unset);
        let wl_unset = ports(
            selecting("app", "wl", "web", Unset),
            &[(8080, Unset), (9090, Disable)],
        );
        let ps = vec![mesh.clone(), ns_unset.clone(), wl_unset.clone()];
        // Port UNSET -> workload UNSET -> namespace UNSET -> mesh STRICT.
        assert_eq!(
            decide(&ps, 8080, Permissive),
            (Strict, Level::Mesh, Some("ambit-system/mesh".into()))
        );
        // A port that is set still wins; DISABLE lets plaintext in.
        let d = effective_mode(&ps, "app", &labels("web"), 9090, Permissive);
        assert_eq!((d.mode, d.level), (Disable, Level::Port));
        assert!(d.allows_plaintext());
        // Everything UNSET: the default.
        let ps = vec![ns_unset, wl_unset];
        assert_eq!(decide(&ps, 80, Strict), (Strict, Level::Default, None));
        assert_eq!(decide(&ps, 80, Unset), (Permissive, Level::Default, None));
    }

    #[test]
    fn only_policies_that_apply_count() {
        let ps = vec![
            // Another namespace's, another app's, and a selector in the root namespace
            // (which selects only there).
            pa("other", "ns", Scope::Namespace, Strict),
            selecting("app", "db", "db", Strict),
            selecting("ambit-system", "root-sel", "web", Strict),
            ports(selecting("app", "db-port", "db", Strict), &[(8080, Strict)]),
        ];
        assert_eq!(decide(&ps, 8080, Unset), (Permissive, Level::Default, None));
        // A workload needs every label of the selector.
        let mut two = selecting("app", "two", "web", Strict);
        two.selector.insert("tier".into(), "front".into());
        assert_eq!(decide(&[two.clone()], 80, Unset).1, Level::Default);
        let mut l = labels("web");
        l.insert("tier".into(), "front".into());
        assert_eq!(effective_mode([&two], "app", &l, 80, Unset).mode, Strict);
    }

    #[test]
    fn at_one_level_the_first_by_name_decides() {
        let a = pa("app", "a", Scope::Namespace, Strict);
        let b = pa("app", "b", Scope::Namespace, Permissive);
        assert_eq!(
            decide(&[b.clone(), a.clone()], 80, Unset).2,
            Some("app/a".into())
        );
        assert_eq!(decide(&[a, b], 80, Unset).0, Strict);
        // The port level comes from the winning selector policy only.
        let w1 = selecting("app", "w1", "web", Unset);
        let w2 = ports(selecting("app", "w2", "web", Unset), &[(8080, Strict)]);
        assert_eq!(decide(&[w2, w1], 8080, Unset).1, Level::Default);
    }

    #[test]
    fn reasons_name_the_policy_and_level() {
        let ns = pa("app", "strict", Scope::Namespace, Strict);
        let port = ports(selecting("app", "web", "web", Unset), &[(8080, Permissive)]);
        let ps = [ns, port];
        let at = |p| effective_mode(&ps, "app", &labels("web"), p, Unset).to_string();
        assert_eq!(
            at(9090),
            "STRICT by PeerAuthentication app/strict (namespace)"
        );
        assert_eq!(
            at(8080),
            "PERMISSIVE by PeerAuthentication app/web (port 8080)"
        );
        let d = effective_mode([], "app", &labels("web"), 80, Strict);
        assert_eq!(d.to_string(), "STRICT by the proxy's default");
    }

    #[test]
    fn wire_round_trip_and_refusals() {
        let p = ports(
            selecting("app", "web", "web", Strict),
            &[(8080, Permissive)],
        );
        let wire = pb::PeerAuthentication::from(&p);
        assert_eq!(PeerAuthentication::try_from(wire.clone()), Ok(p));
        let refused = |f: &dyn Fn(&mut pb::PeerAuthentication)| {
            let mut w = wire.clone();
            f(&mut w);
            PeerAuthentication::try_from(w)
                .expect_err("accepted")
                .to_string()
        };
        let e = refused(&|w| w.mode = 9);
        assert!(e.contains("peer authentication app/web: mode \"9\""), "{e}");
        let e = refused(&|w| {
            w.port_level_mtls.insert(70000, 3);
        });
        assert!(
            e.contains("port_level_mtls[70000]") && e.contains("65535"),
            "{e}"
        );
        let e = refused(&|w| {
            w.port_level_mtls.insert(0, 3);
        });
        assert!(e.contains("port 0"), "{e}");
        let e = refused(&|w| {
            w.port_level_mtls.insert(80, 7);
        });
        assert!(
            e.contains("port_level_mtls[80]") && e.contains("unknown mTLS mode"),
            "{e}"
        );
        let e = refused(&|w| {
            w.scope = pb::PolicyScope::Namespace as i32;
            w.selector.clear();
        });
        assert!(e.contains("need a workload selector"), "{e}");
        let e = refused(&|w| w.name.clear());
        assert!(e.contains("name is empty"), "{e}");
    }
}
