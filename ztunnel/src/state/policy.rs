//! L4 authorization: the policies ztunnel enforces on inbound connections.
//!
//! Semantics are Istio's `AuthorizationPolicy`, restricted to what a node proxy can see
//! (identities, addresses, ports; never HTTP):
//!
//! - a connection matching any DENY policy is denied; matching AUDIT policies only flag it;
//! - if any ALLOW policy applies to the destination, the connection must match one of them;
//!   with no ALLOW policy, it is allowed;
//! - a policy matches when one of its rules does (an ALLOW policy without rules matches
//!   nothing, which is how "deny everything" is spelled); within a rule, `from` entries are
//!   ORed, `to` entries are ORed, `when` conditions are ANDed, and the three are ANDed; within
//!   an entry, fields are ANDed and the values of one field are ORed; `not_*` fields negate.
//!
//! Rules that need L7 (hosts, methods, paths, request principals, `request.*` conditions)
//! fail closed here, because guessing wrong must never open access: such a rule never
//! matches in an ALLOW policy, and in a DENY (or AUDIT) policy it matches whenever its L4
//! parts do.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ambit_hbone::Identity;
use ambit_proto::discovery as pb;
use ipnet::IpNet;
use serde::Serialize;

use super::store::State;
use super::workload::Workload;
use super::{ip_from_bytes, port_from_u32, ConvertError};

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyScope {
    /// Workloads listing the policy in their `authorization_policies` (label selectors are
    /// resolved by the controller).
    WorkloadSelector,
    /// Every workload of the policy's namespace.
    Namespace,
    /// Every workload (the policy lives in the root namespace).
    Global,
}

/// What a matching policy does to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    /// Log only.
    Audit,
}

/// A string pattern as Istio writes them: exact, `prefix*`, `*suffix` or `*` (presence).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(Arc<str>),
    Prefix(Arc<str>),
    Suffix(Arc<str>),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Parses Istio's wildcard spelling (used by conditions and the static file).
    pub fn from_pattern(p: &str) -> Self {
        if p == "*" {
            StringMatch::Presence
        } else if let Some(rest) = p.strip_prefix('*') {
            StringMatch::Suffix(rest.into())
        } else if let Some(rest) = p.strip_suffix('*') {
            StringMatch::Prefix(rest.into())
        } else {
            StringMatch::Exact(p.into())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v == &**e,
            StringMatch::Prefix(p) => v.starts_with(&**p),
            StringMatch::Suffix(s) => v.ends_with(&**s),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(e) => write!(f, "{e}"),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Presence => write!(f, "*"),
        }
    }
}

/// Who the connection comes from. Empty fields do not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    /// Source identity without "spiffe://" ("cluster.local/ns/a/sa/b").
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// Source address of the connection.
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    /// Original client address; at L4 the same as the source address.
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
    /// L7 fields this entry uses (ztunnel cannot check them).
    pub l7_fields: Vec<&'static str>,
}

/// What the connection goes to. Empty fields do not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// L7 fields this entry uses (ztunnel cannot check them).
    pub l7_fields: Vec<&'static str>,
}

/// A `when` condition, its key resolved to what ztunnel can evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "key", rename_all = "snake_case")]
pub enum Condition {
    /// `source.ip` / `remote.ip`.
    SourceIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    DestinationIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    SourceNamespace {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    SourcePrincipal {
        values: Vec<StringMatch>,
        not_values: Vec<StringMatch>,
    },
    DestinationPort {
        values: Vec<u16>,
        not_values: Vec<u16>,
    },
    /// An L7 (or unknown) key that ztunnel cannot evaluate: the rule fails closed.
    Unsupported { name: Arc<str> },
}

/// One rule: `from` AND `to` AND `when`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// The rule needs something ztunnel cannot see.
    pub fn uses_l7(&self) -> bool {
        self.from.iter().any(|s| !s.l7_fields.is_empty())
            || self.to.iter().any(|o| !o.l7_fields.is_empty())
            || self
                .when
                .iter()
                .any(|c| matches!(c, Condition::Unsupported { .. }))
    }
}

/// An authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Authorization {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub scope: PolicyScope,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// "namespace/name" of the Gateway it targets: enforced by that waypoint, not here.
    pub target_gateway: Option<Arc<str>>,
    /// "namespace/hostname" of the Service it targets: enforced by its waypoint, not here.
    pub target_service: Option<Arc<str>>,
}

impl Authorization {
    /// "namespace/name", the key the protocol and workloads use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Bound to a waypoint rather than to workloads, so ztunnel does not enforce it.
    pub fn for_waypoint(&self) -> bool {
        self.target_gateway.is_some() || self.target_service.is_some()
    }
}

// ---- conversion ------------------------------------------------------------------------

type Ctx<'a> = &'a dyn Fn() -> String;

fn string_match(res: Ctx, field: &str, m: &pb::StringMatch) -> Result<StringMatch, ConvertError> {
    use pb::string_match::Match;
    let invalid = |why: &str| ConvertError::Invalid {
        resource: res(),
        field: field.to_string(),
        value: format!("{m:?}"),
        why: why.into(),
    };
    match &m.r#match {
        Some(Match::Exact(s)) => Ok(StringMatch::Exact(s.as_str().into())),
        Some(Match::Prefix(s)) => Ok(StringMatch::Prefix(s.as_str().into())),
        Some(Match::Suffix(s)) => Ok(StringMatch::Suffix(s.as_str().into())),
        Some(Match::Presence(true)) => Ok(StringMatch::Presence),
        Some(Match::Presence(false)) => Err(invalid("presence must be true when set")),
        None => Err(invalid("no match set")),
    }
}

fn string_matches(
    res: Ctx,
    field: &str,
    ms: &[pb::StringMatch],
) -> Result<Vec<StringMatch>, ConvertError> {
    ms.iter()
        .enumerate()
        .map(|(i, m)| string_match(res, &format!("{field}[{i}]"), m))
        .collect()
}

fn ip_blocks(res: Ctx, field: &str, bs: &[pb::IpBlock]) -> Result<Vec<IpNet>, ConvertError> {
    bs.iter()
        .enumerate()
        .map(|(i, b)| {
            let f = format!("{field}[{i}]");
            let ip = ip_from_bytes(res, &|| format!("{f}.address"), &b.address)?;
            let len = u8::try_from(b.prefix_len).unwrap_or(u8::MAX);
            IpNet::new(ip, len)
                .map(|n| n.trunc())
                .map_err(|e| ConvertError::Invalid {
                    resource: res(),
                    field: format!("{f}.prefix_len"),
                    value: b.prefix_len.to_string(),
                    why: e.to_string(),
                })
        })
        .collect()
}

/// Parses an address or CIDR as written in conditions ("10.0.0.1", "10.0.0.0/8").
pub fn parse_ip_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

fn condition(res: Ctx, i: usize, c: &pb::Condition) -> Result<Condition, ConvertError> {
    let field = |sub: &str, j: usize| format!("rule when[{i}] ({}) {sub}[{j}]", c.key);
    let nets = |vals: &[String], sub: &str| -> Result<Vec<IpNet>, ConvertError> {
        vals.iter()
            .enumerate()
            .map(|(j, v)| {
                parse_ip_net(v).ok_or_else(|| ConvertError::Invalid {
                    resource: res(),
                    field: field(sub, j),
                    value: v.clone(),
                    why: "not an IP address or CIDR".into(),
                })
            })
            .collect()
    };
    let ports = |vals: &[String], sub: &str| -> Result<Vec<u16>, ConvertError> {
        vals.iter()
            .enumerate()
            .map(|(j, v)| {
                v.parse::<u16>().map_err(|e| ConvertError::Invalid {
                    resource: res(),
                    field: field(sub, j),
                    value: v.clone(),
                    why: e.to_string(),
                })
            })
            .collect()
    };
    let strs = |vals: &[String]| vals.iter().map(|v| StringMatch::from_pattern(v)).collect();
    Ok(match c.key.as_str() {
        "source.ip" | "remote.ip" => Condition::SourceIp {
            values: nets(&c.values, "values")?,
            not_values: nets(&c.not_values, "not_values")?,
        },
        "destination.ip" => Condition::DestinationIp {
            values: nets(&c.values, "values")?,
            not_values: nets(&c.not_values, "not_values")?,
        },
        "source.namespace" => Condition::SourceNamespace {
            values: strs(&c.values),
            not_values: strs(&c.not_values),
        },
        "source.principal" => Condition::SourcePrincipal {
            values: principal_form(strs(&c.values)),
            not_values: principal_form(strs(&c.not_values)),
        },
        "destination.port" => Condition::DestinationPort {
            values: ports(&c.values, "values")?,
            not_values: ports(&c.not_values, "not_values")?,
        },
        // request.*, connection.sni, experimental.* and anything newer than this code:
        // not knowable at L4, so the rule fails closed rather than the push failing.
        other => Condition::Unsupported { name: other.into() },
    })
}

/// Principals are matched in Istio's form, without "spiffe://". A pattern written with the
/// scheme would otherwise never match: an ALLOW would fail closed, but a DENY would fail
/// open, so the scheme is dropped here rather than trusted to every policy author.
fn principal_form(ms: Vec<StringMatch>) -> Vec<StringMatch> {
    let strip = |s: Arc<str>| match s.strip_prefix("spiffe://") {
        Some(rest) => Arc::from(rest),
        None => s,
    };
    ms.into_iter()
        .map(|m| match m {
            StringMatch::Exact(s) => StringMatch::Exact(strip(s)),
            StringMatch::Prefix(s) => StringMatch::Prefix(strip(s)),
            other => other,
        })
        .collect()
}

fn source(res: Ctx, field: &str, s: &pb::Source) -> Result<Source, ConvertError> {
    let f = |name: &str| format!("{field}.{name}");
    let mut l7_fields = Vec::new();
    if !s.request_principals.is_empty() {
        l7_fields.push("request_principals");
    }
    if !s.not_request_principals.is_empty() {
        l7_fields.push("not_request_principals");
    }
    Ok(Source {
        principals: principal_form(string_matches(res, &f("principals"), &s.principals)?),
        not_principals: principal_form(string_matches(
            res,
            &f("not_principals"),
            &s.not_principals,
        )?),
        namespaces: string_matches(res, &f("namespaces"), &s.namespaces)?,
        not_namespaces: string_matches(res, &f("not_namespaces"), &s.not_namespaces)?,
        ip_blocks: ip_blocks(res, &f("ip_blocks"), &s.ip_blocks)?,
        not_ip_blocks: ip_blocks(res, &f("not_ip_blocks"), &s.not_ip_blocks)?,
        remote_ip_blocks: ip_blocks(res, &f("remote_ip_blocks"), &s.remote_ip_blocks)?,
        not_remote_ip_blocks: ip_blocks(res, &f("not_remote_ip_blocks"), &s.not_remote_ip_blocks)?,
        l7_fields,
    })
}

fn operation(res: Ctx, field: &str, o: &pb::Operation) -> Result<Operation, ConvertError> {
    let ports = |name: &str, ps: &[u32]| -> Result<Vec<u16>, ConvertError> {
        ps.iter()
            .enumerate()
            .map(|(j, &p)| port_from_u32(res, &|| format!("{field}.{name}[{j}]"), p, false))
            .collect()
    };
    let mut l7_fields = Vec::new();
    for (name, used) in [
        ("hosts", !o.hosts.is_empty()),
        ("not_hosts", !o.not_hosts.is_empty()),
        ("methods", !o.methods.is_empty()),
        ("not_methods", !o.not_methods.is_empty()),
        ("paths", !o.paths.is_empty()),
        ("not_paths", !o.not_paths.is_empty()),
    ] {
        if used {
            l7_fields.push(name);
        }
    }
    // L7 values are still validated so that a malformed policy is refused here too.
    string_matches(res, &format!("{field}.hosts"), &o.hosts)?;
    string_matches(res, &format!("{field}.not_hosts"), &o.not_hosts)?;
    string_matches(res, &format!("{field}.paths"), &o.paths)?;
    string_matches(res, &format!("{field}.not_paths"), &o.not_paths)?;
    Ok(Operation {
        ports: ports("ports", &o.ports)?,
        not_ports: ports("not_ports", &o.not_ports)?,
        l7_fields,
    })
}

impl TryFrom<pb::Authorization> for Authorization {
    type Error = ConvertError;

    fn try_from(a: pb::Authorization) -> Result<Self, Self::Error> {
        let resource = || format!("authorization {}/{}", a.namespace, a.name);
        let res: Ctx = &resource;
        if a.name.is_empty() {
            return Err(ConvertError::Missing {
                resource: resource(),
                field: "name",
            });
        }
        if a.namespace.is_empty() {
            return Err(ConvertError::Missing {
                resource: resource(),
                field: "namespace",
            });
        }
        let invalid_enum = |field: &str, v: i32| ConvertError::Invalid {
            resource: resource(),
            field: field.into(),
            value: v.to_string(),
            why: "unknown value".into(),
        };
        let scope = match pb::PolicyScope::try_from(a.scope) {
            Ok(pb::PolicyScope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Ok(pb::PolicyScope::Namespace) => PolicyScope::Namespace,
            Ok(pb::PolicyScope::Global) => PolicyScope::Global,
            Err(_) => return Err(invalid_enum("scope", a.scope)),
        };
        let action = match pb::PolicyAction::try_from(a.action) {
            Ok(pb::PolicyAction::Allow) => Action::Allow,
            Ok(pb::PolicyAction::Deny) => Action::Deny,
            Ok(pb::PolicyAction::Audit) => Action::Audit,
            Err(_) => return Err(invalid_enum("action", a.action)),
        };
        let mut rules = Vec::with_capacity(a.rules.len());
        for (i, r) in a.rules.iter().enumerate() {
            let from = r
                .from
                .iter()
                .enumerate()
                .map(|(j, s)| source(res, &format!("rules[{i}].from[{j}]"), s))
                .collect::<Result<_, _>>()?;
            let to =
                r.to.iter()
                    .enumerate()
                    .map(|(j, o)| operation(res, &format!("rules[{i}].to[{j}]"), o))
                    .collect::<Result<_, _>>()?;
            let when = r
                .when
                .iter()
                .enumerate()
                .map(|(j, c)| condition(res, j, c))
                .collect::<Result<_, _>>()?;
            rules.push(Rule { from, to, when });
        }
        let opt = |s: &str| (!s.is_empty()).then(|| Arc::<str>::from(s));
        Ok(Authorization {
            name: a.name.as_str().into(),
            namespace: a.namespace.as_str().into(),
            scope,
            action,
            rules,
            target_gateway: opt(&a.target_gateway),
            target_service: opt(&a.target_service),
        })
    }
}

// ---- evaluation ------------------------------------------------------------------------

/// What policy sees of a connection arriving at a workload.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// Peer identity from its certificate; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// The outcome of L4 authorization, with the reason the access log prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// An AUDIT policy matched: log the connection as audited.
    pub audit: bool,
    /// "denied by default/deny-port (rule 0)", "no ALLOW policy matched (checked: a/x)"...
    pub reason: String,
}

/// The connection's attributes, computed once per evaluation.
struct Facts<'a> {
    principal: Option<String>,
    namespace: Option<&'a str>,
    conn: &'a ConnectionInfo<'a>,
}

/// How L7 parts are treated: ignored (DENY/AUDIT: match on L4 alone) or fatal (ALLOW).
#[derive(Clone, Copy, PartialEq, Eq)]
enum L7 {
    NeverMatches,
    Ignored,
}

fn any_str(ms: &[StringMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| ms.iter().any(|m| m.matches(v)))
}

fn any_net(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// `values` (if any) must match and `not_values` must not.
fn field<T>(values: &[T], not_values: &[T], hit: impl Fn(&[T]) -> bool) -> bool {
    (values.is_empty() || hit(values)) && (not_values.is_empty() || !hit(not_values))
}

impl Source {
    fn matches(&self, f: &Facts) -> bool {
        let p = f.principal.as_deref();
        let ns = f.namespace;
        let ip = f.conn.src_ip;
        field(&self.principals, &self.not_principals, |m| any_str(m, p))
            && field(&self.namespaces, &self.not_namespaces, |m| any_str(m, ns))
            && field(&self.ip_blocks, &self.not_ip_blocks, |n| any_net(n, ip))
            && field(&self.remote_ip_blocks, &self.not_remote_ip_blocks, |n| {
                any_net(n, ip)
            })
    }
}

impl Operation {
    fn matches(&self, f: &Facts) -> bool {
        let port = f.conn.dst_port;
        field(&self.ports, &self.not_ports, |ps| ps.contains(&port))
    }
}

impl Condition {
    fn matches(&self, f: &Facts) -> bool {
        let c = f.conn;
        match self {
            Condition::SourceIp { values, not_values } => {
                field(values, not_values, |n| any_net(n, c.src_ip))
            }
            Condition::DestinationIp { values, not_values } => {
                field(values, not_values, |n| any_net(n, c.dst_ip))
            }
            Condition::SourceNamespace { values, not_values } => {
                field(values, not_values, |m| any_str(m, f.namespace))
            }
            Condition::SourcePrincipal { values, not_values } => {
                field(values, not_values, |m| any_str(m, f.principal.as_deref()))
            }
            Condition::DestinationPort { values, not_values } => {
                field(values, not_values, |ps| ps.contains(&c.dst_port))
            }
            // Only reached when L7 parts are ignored (see Rule::matches).
            Condition::Unsupported { .. } => true,
        }
    }
}

impl Rule {
    fn matches(&self, f: &Facts, l7: L7) -> bool {
        if l7 == L7::NeverMatches && self.uses_l7() {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(f)))
            && self.when.iter().all(|c| c.matches(f))
    }
}

impl Authorization {
    /// Index of the first rule matching the connection, if any.
    fn matching_rule(&self, f: &Facts) -> Option<usize> {
        let l7 = match self.action {
            Action::Allow => L7::NeverMatches,
            Action::Deny | Action::Audit => L7::Ignored,
        };
        self.rules.iter().position(|r| r.matches(f, l7))
    }
}

/// Evaluates `policies` (those applying to the destination) against a connection.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    conn: &ConnectionInfo<'_>,
) -> Verdict {
    let principal = conn.src_identity.map(|id| {
        // Istio's principal form: the SPIFFE URI without its scheme.
        let s = id.to_string();
        s.strip_prefix("spiffe://").map(str::to_string).unwrap_or(s)
    });
    let facts = Facts {
        principal,
        namespace: conn.src_identity.map(|id| id.namespace()),
        conn,
    };
    let mut audits = Vec::new();
    let mut allows_checked = Vec::new();
    let mut allowed_by = None;
    let mut denied_by = None;
    // Every policy is looked at (no early return on DENY) so that AUDIT policies flag denied
    // connections too.
    for p in policies {
        match p.action {
            Action::Deny => {
                if denied_by.is_none() {
                    if let Some(i) = p.matching_rule(&facts) {
                        denied_by = Some(format!("denied by {} (rule {i})", p.key()));
                    }
                }
            }
            Action::Audit => {
                if let Some(i) = p.matching_rule(&facts) {
                    audits.push(format!("{} (rule {i})", p.key()));
                }
            }
            Action::Allow => {
                if allowed_by.is_none() {
                    if let Some(i) = p.matching_rule(&facts) {
                        allowed_by = Some(format!("allowed by {} (rule {i})", p.key()));
                    }
                }
                allows_checked.push(p.key());
            }
        }
    }
    let (allowed, mut reason) = match (denied_by, allowed_by) {
        (Some(r), _) => (false, r),
        (None, Some(r)) => (true, r),
        (None, None) if allows_checked.is_empty() => (true, "no ALLOW policy applies".to_string()),
        (None, None) => (
            false,
            format!(
                "no ALLOW policy matched (checked: {})",
                allows_checked.join(", ")
            ),
        ),
    };
    if !audits.is_empty() {
        reason.push_str(&format!("; audited by {}", audits.join(", ")));
    }
    Verdict {
        allowed,
        audit: !audits.is_empty(),
        reason,
    }
}

/// Authorizes a connection to `dst` with the policies `state` applies to it (global, its
/// namespace's, and those selecting it).
pub fn authorize(state: &State, dst: &Workload, conn: &ConnectionInfo<'_>) -> Verdict {
    let policies = state.policies_for(dst);
    evaluate(policies.iter().map(|p| &**p), conn)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
