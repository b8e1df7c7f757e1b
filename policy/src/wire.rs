//! The discovery protocol's form of a policy, both ways: the controller encodes what it
//! converted ([`From<&Policy>`]), each proxy decodes a push at its edge
//! ([`TryFrom<pb::Authorization>`]). One decoder, so ztunnel and the waypoint accept and
//! refuse the same pushes. Errors name the policy and the field
//! (`authorization app/p: rules[0].to[0].ports[0] "70000" is invalid: ...`).

use std::net::IpAddr;
use std::sync::Arc;

use ambit_proto::discovery as pb;
use ambit_proto::ip_from_bytes as pb_ip;
use ipnet::IpNet;

use crate::model::{Action, Condition, Operation, Policy, Rule, Scope, Source};
use crate::pattern::StringMatch;

/// Why a protobuf policy could not be decoded. The message names the policy first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
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
    /// A value outside its field's domain (a port above 65535, an unknown enum value, an
    /// empty match, a condition value that does not parse for its key...).
    #[error("{resource}: {field} {value:?} is invalid: {why}")]
    Invalid {
        resource: String,
        field: String,
        value: String,
        why: String,
    },
}

type Res<'a> = &'a dyn Fn() -> String;

fn invalid(res: Res, field: String, value: String, why: impl Into<String>) -> WireError {
    WireError::Invalid {
        resource: res(),
        field,
        value,
        why: why.into(),
    }
}

fn string_match(res: Res, field: String, m: &pb::StringMatch) -> Result<StringMatch, WireError> {
    use pb::string_match::Match;
    match &m.r#match {
        Some(Match::Exact(s)) => Ok(StringMatch::Exact(s.as_str().into())),
        Some(Match::Prefix(s)) => Ok(StringMatch::Prefix(s.as_str().into())),
        Some(Match::Suffix(s)) => Ok(StringMatch::Suffix(s.as_str().into())),
        Some(Match::Presence(true)) => Ok(StringMatch::Presence),
        Some(Match::Presence(false)) => Err(invalid(
            res,
            field,
            format!("{m:?}"),
            "presence must be true when set",
        )),
        None => Err(invalid(res, field, format!("{m:?}"), "no match set")),
    }
}

fn string_matches(
    res: Res,
    field: &str,
    ms: &[pb::StringMatch],
) -> Result<Vec<StringMatch>, WireError> {
    ms.iter()
        .enumerate()
        .map(|(i, m)| string_match(res, format!("{field}[{i}]"), m))
        .collect()
}

fn ip(res: Res, field: String, bytes: &[u8]) -> Result<IpAddr, WireError> {
    pb_ip(bytes).map_err(|len| WireError::Address {
        resource: res(),
        field,
        len,
    })
}

fn ip_blocks(res: Res, field: &str, bs: &[pb::IpBlock]) -> Result<Vec<IpNet>, WireError> {
    bs.iter()
        .enumerate()
        .map(|(i, b)| {
            let f = format!("{field}[{i}]");
            let addr = ip(res, format!("{f}.address"), &b.address)?;
            let len = u8::try_from(b.prefix_len).unwrap_or(u8::MAX);
            IpNet::new(addr, len).map(|n| n.trunc()).map_err(|e| {
                invalid(
                    res,
                    format!("{f}.prefix_len"),
                    b.prefix_len.to_string(),
                    e.to_string(),
                )
            })
        })
        .collect()
}

fn ports(res: Res, field: &str, ps: &[u32]) -> Result<Vec<u16>, WireError> {
    ps.iter()
        .enumerate()
        .map(|(j, &p)| match u16::try_from(p) {
            Ok(0) => Err(invalid(
                res,
                format!("{field}[{j}]"),
                p.to_string(),
                "port 0 is not a port",
            )),
            Ok(p) => Ok(p),
            Err(_) => Err(invalid(
                res,
                format!("{field}[{j}]"),
                p.to_string(),
                "ports stop at 65535",
            )),
        })
        .collect()
}

fn source(res: Res, field: &str, s: &pb::Source) -> Result<Source, WireError> {
    let f = |name: &str| format!("{field}.{name}");
    Ok(Source {
        principals: string_matches(res, &f("principals"), &s.principals)?,
        not_principals: string_matches(res, &f("not_principals"), &s.not_principals)?,
        namespaces: string_matches(res, &f("namespaces"), &s.namespaces)?,
        not_namespaces: string_matches(res, &f("not_namespaces"), &s.not_namespaces)?,
        ip_blocks: ip_blocks(res, &f("ip_blocks"), &s.ip_blocks)?,
        not_ip_blocks: ip_blocks(res, &f("not_ip_blocks"), &s.not_ip_blocks)?,
        remote_ip_blocks: ip_blocks(res, &f("remote_ip_blocks"), &s.remote_ip_blocks)?,
        not_remote_ip_blocks: ip_blocks(res, &f("not_remote_ip_blocks"), &s.not_remote_ip_blocks)?,
        request_principals: string_matches(res, &f("request_principals"), &s.request_principals)?,
        not_request_principals: string_matches(
            res,
            &f("not_request_principals"),
            &s.not_request_principals,
        )?,
    })
}

fn operation(res: Res, field: &str, o: &pb::Operation) -> Result<Operation, WireError> {
    let f = |name: &str| format!("{field}.{name}");
    Ok(Operation {
        ports: ports(res, &f("ports"), &o.ports)?,
        not_ports: ports(res, &f("not_ports"), &o.not_ports)?,
        hosts: string_matches(res, &f("hosts"), &o.hosts)?,
        not_hosts: string_matches(res, &f("not_hosts"), &o.not_hosts)?,
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: string_matches(res, &f("paths"), &o.paths)?,
        not_paths: string_matches(res, &f("not_paths"), &o.not_paths)?,
    })
}

impl TryFrom<pb::Authorization> for Policy {
    type Error = WireError;

    fn try_from(a: pb::Authorization) -> Result<Self, WireError> {
        let resource = || format!("authorization {}/{}", a.namespace, a.name);
        let res: Res = &resource;
        for (field, value) in [("name", &a.name), ("namespace", &a.namespace)] {
            if value.is_empty() {
                return Err(WireError::Missing {
                    resource: resource(),
                    field,
                });
            }
        }
        let unknown =
            |field: &str, v: i32| invalid(res, field.into(), v.to_string(), "unknown value");
        let scope = match pb::PolicyScope::try_from(a.scope) {
            Ok(pb::PolicyScope::WorkloadSelector) => Scope::WorkloadSelector,
            Ok(pb::PolicyScope::Namespace) => Scope::Namespace,
            Ok(pb::PolicyScope::Global) => Scope::Global,
            Err(_) => return Err(unknown("scope", a.scope)),
        };
        let action = match pb::PolicyAction::try_from(a.action) {
            Ok(pb::PolicyAction::Allow) => Action::Allow,
            Ok(pb::PolicyAction::Deny) => Action::Deny,
            Ok(pb::PolicyAction::Audit) => Action::Audit,
            Err(_) => return Err(unknown("action", a.action)),
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
                .map(|(j, c)| {
                    Condition::parse(c.key.clone(), c.values.clone(), c.not_values.clone()).map_err(
                        |e| {
                            invalid(
                                res,
                                format!("rules[{i}].when[{j}] ({}) {}[{}]", e.key, e.list, e.index),
                                e.value,
                                e.why,
                            )
                        },
                    )
                })
                .collect::<Result<_, _>>()?;
            rules.push(Rule { from, to, when });
        }
        let target = |s: &str| (!s.is_empty()).then(|| Arc::<str>::from(s));
        Ok(Policy {
            name: a.name.as_str().into(),
            namespace: a.namespace.as_str().into(),
            scope,
            action,
            rules,
            target_gateway: target(&a.target_gateway),
            target_service: target(&a.target_service),
        })
    }
}

// ---- encoding (the controller) -----------------------------------------------------------

fn encode_matches(ms: &[StringMatch]) -> Vec<pb::StringMatch> {
    use pb::string_match::Match;
    ms.iter()
        .map(|m| pb::StringMatch {
            r#match: Some(match m {
                StringMatch::Exact(s) => Match::Exact(s.to_string()),
                StringMatch::Prefix(s) => Match::Prefix(s.to_string()),
                StringMatch::Suffix(s) => Match::Suffix(s.to_string()),
                StringMatch::Presence => Match::Presence(true),
            }),
        })
        .collect()
}

fn encode_blocks(nets: &[IpNet]) -> Vec<pb::IpBlock> {
    nets.iter()
        .map(|n| pb::IpBlock {
            address: match n.network() {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            },
            prefix_len: u32::from(n.prefix_len()),
        })
        .collect()
}

fn encode_ports(ps: &[u16]) -> Vec<u32> {
    ps.iter().copied().map(u32::from).collect()
}

impl From<&Rule> for pb::Rule {
    fn from(r: &Rule) -> Self {
        pb::Rule {
            from: r
                .from
                .iter()
                .map(|s| pb::Source {
                    principals: encode_matches(&s.principals),
                    not_principals: encode_matches(&s.not_principals),
                    namespaces: encode_matches(&s.namespaces),
                    not_namespaces: encode_matches(&s.not_namespaces),
                    ip_blocks: encode_blocks(&s.ip_blocks),
                    not_ip_blocks: encode_blocks(&s.not_ip_blocks),
                    request_principals: encode_matches(&s.request_principals),
                    not_request_principals: encode_matches(&s.not_request_principals),
                    remote_ip_blocks: encode_blocks(&s.remote_ip_blocks),
                    not_remote_ip_blocks: encode_blocks(&s.not_remote_ip_blocks),
                })
                .collect(),
            to: r
                .to
                .iter()
                .map(|o| pb::Operation {
                    ports: encode_ports(&o.ports),
                    not_ports: encode_ports(&o.not_ports),
                    hosts: encode_matches(&o.hosts),
                    not_hosts: encode_matches(&o.not_hosts),
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: encode_matches(&o.paths),
                    not_paths: encode_matches(&o.not_paths),
                })
                .collect(),
            when: r
                .when
                .iter()
                .map(|c| pb::Condition {
                    key: c.key().to_string(),
                    values: c.values().to_vec(),
                    not_values: c.not_values().to_vec(),
                })
                .collect(),
        }
    }
}

impl From<&Policy> for pb::Authorization {
    fn from(p: &Policy) -> Self {
        pb::Authorization {
            name: p.name.to_string(),
            namespace: p.namespace.to_string(),
            scope: match p.scope {
                Scope::WorkloadSelector => pb::PolicyScope::WorkloadSelector,
                Scope::Namespace => pb::PolicyScope::Namespace,
                Scope::Global => pb::PolicyScope::Global,
            } as i32,
            action: match p.action {
                Action::Allow => pb::PolicyAction::Allow,
                Action::Deny => pb::PolicyAction::Deny,
                Action::Audit => pb::PolicyAction::Audit,
            } as i32,
            rules: p.rules.iter().map(pb::Rule::from).collect(),
            target_gateway: p.target_gateway.as_deref().unwrap_or_default().to_string(),
            target_service: p.target_service.as_deref().unwrap_or_default().to_string(),
        }
    }
}
