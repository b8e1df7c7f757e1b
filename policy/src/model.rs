//! The policy as every component holds it: Istio's `AuthorizationPolicy` with its values
//! parsed (patterns, CIDRs, ports, condition keys), so a malformed value is refused once,
//! where it is read, and evaluation never parses.
//!
//! The serde shape is the one operators write (camelCase fields, patterns as strings):
//! the waypoint reads it from its static file, and both proxies dump it on their admin port.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use crate::pattern::{PatternError, StringMatch};

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// When any ALLOW policy applies, a request must match one of them.
    #[default]
    Allow,
    /// A match refuses the request.
    Deny,
    /// A match is reported; the verdict is unchanged.
    Audit,
}

/// Which workloads a policy applies to (what ztunnel indexes it by; the waypoint uses the
/// targets instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Workloads listing the policy by key (the controller resolves label selectors).
    #[default]
    WorkloadSelector,
    /// Every workload of the policy's namespace.
    Namespace,
    /// Every workload (the policy lives in the root namespace).
    Global,
}

/// An authorization policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Policy {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub scope: Scope,
    pub action: Action,
    /// ORed. An ALLOW without rules matches nothing ("deny everything" is spelled so); a
    /// rule without clauses matches everything.
    pub rules: Vec<Rule>,
    /// `namespace/name` of the Gateway it targets: enforced by that waypoint.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty"
    )]
    pub target_gateway: Option<Arc<str>>,
    /// `namespace/hostname` of the Service it targets: enforced by that service's waypoint.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty"
    )]
    pub target_service: Option<Arc<str>>,
}

impl Policy {
    /// `namespace/name`, the key the protocol, workloads and logs use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Bound to a waypoint (by `targetRefs`) rather than to workloads.
    pub fn for_waypoint(&self) -> bool {
        self.target_gateway.is_some() || self.target_service.is_some()
    }
}

/// An empty string means "no target", as on the wire.
fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(Arc::from))
}

/// One rule: `from` (ORed) AND `to` (ORed) AND `when` (ANDed); an empty part matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// The rule names something a node proxy cannot see (HTTP fields, JWT principals or
    /// claims, condition keys this code does not know).
    pub fn uses_l7(&self) -> bool {
        self.unknowable(false)
    }

    /// The rule names something that cannot be known, given whether HTTP attributes are
    /// (a request's token, when it has one, is validated where HTTP is parsed).
    pub(crate) fn unknowable(&self, http_known: bool) -> bool {
        (!http_known
            && (self.from.iter().any(Source::uses_jwt) || self.to.iter().any(Operation::uses_http)))
            || self.when.iter().any(|c| c.unknowable(http_known))
    }
}

/// Who the request comes from. Fields are ANDed, the values of one field ORed; empty
/// fields do not constrain; `not_*` fields exclude.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Source {
    /// Peer identities in Istio's form (`cluster.local/ns/a/sa/b`).
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    /// The peer identity's namespace.
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// The connection's source address.
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    /// The original client address; no proxy here reads forwarding headers, so it is the
    /// source address too.
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
    /// JWT `iss/sub` of the request's validated token: known where HTTP is (the waypoint
    /// validates tokens per RequestAuthentication); absent when the request carries none.
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
}

impl Source {
    pub(crate) fn uses_jwt(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }
}

/// What the request is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// HTTP from here on. Hosts match the `Host` with or without its port.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    /// Exact methods; `*` in `methods` means any.
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// The path without its query.
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

impl Operation {
    pub(crate) fn uses_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

/// Accepted values and excluded values of one attribute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

/// A `when` condition with its key resolved and its values parsed for that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// `source.ip` and `remote.ip`: addresses or CIDRs.
    SourceIp(Values<IpNet>),
    /// `destination.ip`.
    DestinationIp(Values<IpNet>),
    /// `destination.port`.
    DestinationPort(Values<u16>),
    /// `source.namespace`.
    SourceNamespace(Values<StringMatch>),
    /// `source.principal`, in Istio's form.
    SourcePrincipal(Values<StringMatch>),
    /// `request.headers[name]`: the header's values joined with `,`.
    RequestHeader {
        name: String,
        values: Values<StringMatch>,
    },
    /// `request.auth.principal`: the validated token's `iss/sub`.
    RequestPrincipal(Values<StringMatch>),
    /// `request.auth.audiences`: the validated token's `aud` values.
    RequestAudiences(Values<StringMatch>),
    /// `request.auth.presenter`: the validated token's `azp`.
    RequestPresenter(Values<StringMatch>),
    /// `request.auth.claims[a][b]...`: a claim of the validated token, by its path through
    /// nested objects; a string claim or each string of a list claim is matched.
    RequestClaim {
        path: Vec<String>,
        values: Values<StringMatch>,
    },
    /// A key this code does not know (`connection.sni`, `experimental.*`, newer keys):
    /// never knowable.
    Unknown,
}

/// Why a condition's value does not parse for its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("({key}) {list}[{index}] {value:?} is invalid: {why}")]
pub struct ConditionError {
    /// The condition's key.
    pub key: String,
    /// `values` or `not_values`.
    pub list: &'static str,
    /// Index in that list.
    pub index: usize,
    /// The value as written.
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

/// A `when` condition: the key and values as written, and what they test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ConditionDoc", into = "ConditionDoc")]
pub struct Condition {
    key: String,
    values: Vec<String>,
    not_values: Vec<String>,
    test: Test,
}

/// The written form of a condition.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConditionDoc {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

impl TryFrom<ConditionDoc> for Condition {
    type Error = ConditionError;
    fn try_from(c: ConditionDoc) -> Result<Self, ConditionError> {
        Condition::parse(c.key, c.values, c.not_values)
    }
}

impl From<Condition> for ConditionDoc {
    fn from(c: Condition) -> Self {
        ConditionDoc {
            key: c.key,
            values: c.values,
            not_values: c.not_values,
        }
    }
}

/// The claim path of `request.auth.claims[a][b]`: `["a", "b"]`; `None` for any other
/// key, or for an empty or unbalanced path (the key is then unknown, which fails closed).
fn claim_path(key: &str) -> Option<Vec<String>> {
    let inner = key
        .strip_prefix("request.auth.claims[")?
        .strip_suffix(']')?;
    let path: Vec<String> = inner.split("][").map(str::to_string).collect();
    let malformed = |p: &String| p.is_empty() || p.contains('[') || p.contains(']');
    (!path.iter().any(malformed)).then_some(path)
}

/// Parses an address or CIDR as written in policies (`10.0.0.1`, `10.0.0.0/8`).
pub fn parse_ip_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

impl Condition {
    /// Resolves `key` and parses the values for it. Unknown keys are accepted (they fail
    /// closed when evaluated); malformed values for a known key are refused.
    pub fn parse(
        key: impl Into<String>,
        values: Vec<String>,
        not_values: Vec<String>,
    ) -> Result<Self, ConditionError> {
        let key = key.into();
        let each = |f: &dyn Fn(&str) -> Result<(), String>| -> Result<(), ConditionError> {
            for (list, vs) in [("values", &values), ("not_values", &not_values)] {
                for (index, v) in vs.iter().enumerate() {
                    f(v).map_err(|why| ConditionError {
                        key: key.clone(),
                        list,
                        index,
                        value: v.clone(),
                        why,
                    })?;
                }
            }
            Ok(())
        };
        // Parse into `out` while checking every value, so an error names the first bad one.
        fn collect<T>(
            values: &[String],
            not_values: &[String],
            parse: impl Fn(&str) -> Option<T>,
        ) -> Values<T> {
            Values {
                values: values.iter().filter_map(|v| parse(v)).collect(),
                not_values: not_values.iter().filter_map(|v| parse(v)).collect(),
            }
        }
        let nets = || -> Result<Values<IpNet>, ConditionError> {
            each(&|v| {
                parse_ip_net(v)
                    .map(|_| ())
                    .ok_or_else(|| "not an IP address or CIDR".to_string())
            })?;
            Ok(collect(&values, &not_values, parse_ip_net))
        };
        let patterns = || -> Result<Values<StringMatch>, ConditionError> {
            each(&|v| {
                StringMatch::parse(v)
                    .map(|_| ())
                    .map_err(|e: PatternError| e.to_string())
            })?;
            Ok(collect(&values, &not_values, |v| {
                StringMatch::parse(v).ok()
            }))
        };
        let test = match key.as_str() {
            "source.ip" | "remote.ip" => Test::SourceIp(nets()?),
            "destination.ip" => Test::DestinationIp(nets()?),
            "destination.port" => {
                each(&|v| v.parse::<u16>().map(|_| ()).map_err(|e| e.to_string()))?;
                Test::DestinationPort(collect(&values, &not_values, |v| v.parse().ok()))
            }
            "source.namespace" => Test::SourceNamespace(patterns()?),
            "source.principal" => Test::SourcePrincipal(patterns()?),
            k => match k
                .strip_prefix("request.headers[")
                .and_then(|n| n.strip_suffix(']'))
            {
                Some(name) => Test::RequestHeader {
                    name: name.to_string(),
                    values: patterns()?,
                },
                None => match k {
                    "request.auth.principal" => Test::RequestPrincipal(patterns()?),
                    "request.auth.audiences" => Test::RequestAudiences(patterns()?),
                    "request.auth.presenter" => Test::RequestPresenter(patterns()?),
                    k => match claim_path(k) {
                        Some(path) => Test::RequestClaim {
                            path,
                            values: patterns()?,
                        },
                        None => Test::Unknown,
                    },
                },
            },
        };
        Ok(Condition {
            key,
            values,
            not_values,
            test,
        })
    }

    /// The key as written.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The accepted values as written.
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// The excluded values as written.
    pub fn not_values(&self) -> &[String] {
        &self.not_values
    }

    /// What the condition tests.
    pub fn test(&self) -> &Test {
        &self.test
    }

    pub(crate) fn unknowable(&self, http_known: bool) -> bool {
        match self.test {
            Test::RequestHeader { .. }
            | Test::RequestPrincipal(_)
            | Test::RequestAudiences(_)
            | Test::RequestPresenter(_)
            | Test::RequestClaim { .. } => !http_known,
            Test::Unknown => true,
            _ => false,
        }
    }
}
