//! L7 authorization: `AuthorizationPolicy` rules bound to this waypoint (by `targetRefs` to
//! its Gateway or to a Service it fronts), evaluated per HTTP request, or per connection for
//! traffic that is not HTTP (L4 fields only).
//!
//! Istio semantics: AUDIT policies are noted but never decide; any matching DENY denies; if
//! any ALLOW policy applies, one must match; with none, the request is allowed. For plain
//! TCP, rules that need HTTP fields cannot be checked: an ALLOW rule with them matches
//! nothing, a DENY rule with them is checked on its L4 fields only (fails closed).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why a policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A `when` condition key this waypoint does not know; refusing it is safer than
    /// silently ignoring a condition someone relies on.
    #[error("policy {policy}: unsupported condition key {key:?}")]
    UnsupportedCondition { policy: String, key: String },
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Requests must match one ALLOW policy when any applies.
    #[default]
    Allow,
    /// A match refuses the request.
    Deny,
    /// A match is logged; the verdict is unchanged.
    Audit,
}

/// Istio string matching: `"*"` any non-empty value, `"/api/*"` prefix, `"*.js"` suffix,
/// anything else exact. (De)serialises from that string form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    /// The whole value.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Parses Istio's string form.
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        }
    }

    /// True when `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == e,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    fn to_istio(&self) -> String {
        match self {
            StringMatch::Exact(e) => e.clone(),
            StringMatch::Prefix(p) => format!("{p}*"),
            StringMatch::Suffix(s) => format!("*{s}"),
            StringMatch::Presence => "*".to_string(),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_istio())
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(StringMatch::parse(&s))
    }
}

/// Who sends the request. Every non-empty list must match (ANDed); within a list, any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    /// JWT principals: the waypoint validates no JWTs, so a rule naming them never matches
    /// for ALLOW (and always for DENY): fail closed.
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
}

/// What is requested.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

/// An extra condition (`when`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Condition {
    /// `request.headers[x]`, `source.ip`, `source.namespace`, `source.principal`,
    /// `destination.port`, `request.auth.*` (never matches: no JWT validation here).
    pub key: String,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

/// One rule: `from` ORed, `to` ORed, `when` ANDed; empty parts match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// An authorization policy as the waypoint holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    /// ORed; an ALLOW with none matches nothing.
    pub rules: Vec<Rule>,
    /// `namespace/name` of the Gateway it targets, if any.
    pub target_gateway: String,
    /// `namespace/hostname` of the Service it targets, if any.
    pub target_service: String,
}

impl Policy {
    /// Rejects conditions we cannot evaluate.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for rule in &self.rules {
            for c in &rule.when {
                let known = c.key.starts_with("request.headers[")
                    || c.key.starts_with("request.auth.")
                    || matches!(
                        c.key.as_str(),
                        "source.ip"
                            | "remote.ip"
                            | "source.namespace"
                            | "source.principal"
                            | "destination.port"
                            | "destination.ip"
                    );
                if !known {
                    return Err(PolicyError::UnsupportedCondition {
                        policy: format!("{}/{}", self.namespace, self.name),
                        key: c.key.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// `namespace/name`, as shown to callers and in logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What is known about a request (or a connection, with `http: None`).
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// The caller's SPIFFE identity, e.g. `spiffe://cluster.local/ns/a/sa/b`.
    pub principal: &'a str,
    /// The caller's namespace (from its identity).
    pub namespace: &'a str,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub http: Option<HttpAttributes<'a>>,
}

/// The HTTP parts of a request.
#[derive(Debug, Clone)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// The outcome of evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `audited` lists AUDIT policies that matched.
    Allow { audited: Vec<String> },
    /// Denied by this policy (`namespace/name`), or by the lack of a matching ALLOW.
    Deny { by: String, audited: Vec<String> },
}

/// Evaluates `policies` (already the ones bound to this destination) for `attrs`.
pub fn evaluate(policies: &[&Policy], attrs: &Attributes<'_>) -> Verdict {
    let audited: Vec<String> = policies
        .iter()
        .filter(|p| p.action == Action::Audit && matches_policy(p, attrs))
        .map(|p| p.key())
        .collect();
    if let Some(p) = policies
        .iter()
        .find(|p| p.action == Action::Deny && matches_policy(p, attrs))
    {
        return Verdict::Deny {
            by: p.key(),
            audited,
        };
    }
    let mut allows = policies.iter().filter(|p| p.action == Action::Allow);
    let Some(first) = allows.next() else {
        return Verdict::Allow { audited };
    };
    if matches_policy(first, attrs) || allows.clone().any(|p| matches_policy(p, attrs)) {
        return Verdict::Allow { audited };
    }
    // Name the ALLOW policies that did not let the request in, so the 403 is explainable.
    let names: Vec<String> = std::iter::once(first)
        .chain(allows)
        .map(|p| p.key())
        .collect();
    Verdict::Deny {
        by: format!("no ALLOW policy matched ({})", names.join(", ")),
        audited,
    }
}

fn matches_policy(p: &Policy, a: &Attributes<'_>) -> bool {
    let deny = p.action == Action::Deny;
    p.rules.iter().any(|r| matches_rule(r, a, deny))
}

/// `deny` flips what "cannot be evaluated" means: a DENY must fail closed (match), an
/// ALLOW must fail closed (not match).
fn matches_rule(r: &Rule, a: &Attributes<'_>, deny: bool) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| matches_source(s, a, deny)))
        && (r.to.is_empty() || r.to.iter().any(|o| matches_operation(o, a, deny)))
        && r.when.iter().all(|c| matches_condition(c, a, deny))
}

fn any_str(list: &[StringMatch], value: &str) -> bool {
    list.iter().any(|m| m.matches(value))
}

/// A positive list: empty matches everything, else one must match.
fn pos(list: &[StringMatch], value: &str) -> bool {
    list.is_empty() || any_str(list, value)
}

fn neg(list: &[StringMatch], value: &str) -> bool {
    !any_str(list, value)
}

fn matches_source(s: &Source, a: &Attributes<'_>, deny: bool) -> bool {
    let principal = a.principal.strip_prefix("spiffe://").unwrap_or(a.principal);
    let ip_in = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&a.source_ip));
    let l4 = (pos(&s.principals, principal) || pos(&s.principals, a.principal))
        && neg(&s.not_principals, principal)
        && neg(&s.not_principals, a.principal)
        && pos(&s.namespaces, a.namespace)
        && neg(&s.not_namespaces, a.namespace)
        && (s.ip_blocks.is_empty() || ip_in(&s.ip_blocks))
        && !ip_in(&s.not_ip_blocks);
    // No request authentication here: a rule on JWT principals is never satisfied by the
    // request, so it matches only where matching fails closed (DENY).
    let needs_jwt = !s.request_principals.is_empty() || !s.not_request_principals.is_empty();
    l4 && (!needs_jwt || deny)
}

fn matches_operation(o: &Operation, a: &Attributes<'_>, deny: bool) -> bool {
    let port_ok = (o.ports.is_empty() || o.ports.contains(&a.destination_port))
        && !o.not_ports.contains(&a.destination_port);
    if !port_ok {
        return false;
    }
    let has_l7 = !(o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty());
    let Some(h) = &a.http else {
        return !has_l7 || deny;
    };
    let method_ok = (o.methods.is_empty() || o.methods.iter().any(|m| m == "*" || m == h.method))
        && !o.not_methods.iter().any(|m| m == h.method);
    let host = h.host;
    let host_no_port = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let host_ok =
        (o.hosts.is_empty() || any_str(&o.hosts, host) || any_str(&o.hosts, host_no_port))
            && neg(&o.not_hosts, host)
            && neg(&o.not_hosts, host_no_port);
    method_ok && host_ok && pos(&o.paths, h.path) && neg(&o.not_paths, h.path)
}

fn matches_condition(c: &Condition, a: &Attributes<'_>, deny: bool) -> bool {
    let value: Option<String> = if let Some(name) = c
        .key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        match &a.http {
            None => return deny,
            Some(h) => Some(
                h.headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .filter(|v| !v.is_empty()),
        }
    } else {
        match c.key.as_str() {
            "source.ip" | "remote.ip" => Some(a.source_ip.to_string()),
            "destination.ip" => Some(a.destination_ip.to_string()),
            "source.namespace" => Some(a.namespace.to_string()),
            "source.principal" => Some(
                a.principal
                    .strip_prefix("spiffe://")
                    .unwrap_or(a.principal)
                    .to_string(),
            ),
            "destination.port" => Some(a.destination_port.to_string()),
            // request.auth.*: not validated here.
            _ => return deny,
        }
    };
    let value = value.unwrap_or_default();
    let ip_match = |m: &StringMatch| match (m, value.parse::<IpAddr>()) {
        (StringMatch::Exact(e), Ok(ip)) => {
            e.parse::<IpNet>().map(|n| n.contains(&ip)).unwrap_or(false)
        }
        _ => false,
    };
    let one = |m: &StringMatch| m.matches(&value) || ip_match(m);
    (c.values.is_empty() || c.values.iter().any(one)) && !c.not_values.iter().any(one)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
