//! Evaluation: Istio's order over the policies that apply to a destination.
//!
//! - CUSTOM does not exist here. Any matching DENY denies. Then, if no ALLOW policy
//!   applies, the request is allowed; if some do, one must match. AUDIT policies that
//!   match are reported and never change the verdict. Every policy is looked at, so an
//!   AUDIT flags denied requests too.
//! - A policy matches when one of its rules does; the verdict names the policy and the
//!   index of the rule that decided.
//!
//! What cannot be known fails closed. HTTP attributes are optional: ztunnel never has
//! them, the waypoint has them for HTTP requests but not for opaque TCP. With them come
//! the request's validated token ([`RequestAuth`]), if it had one: request principals and
//! `request.auth.*` are known where HTTP is, and a request without a token simply has no
//! principal and no claims (an ALLOW on `requestPrincipals` does not match it, a
//! `notRequestPrincipals` excludes nothing). Condition keys this code does not know are
//! never known. A rule naming anything unknowable never
//! matches in an ALLOW policy; in a DENY or AUDIT policy it matches on its knowable parts
//! alone. Guessing wrong must never open access.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Action, Condition, Operation, Policy, Rule, Source, Test, Values};
use crate::pattern::StringMatch;
use crate::trace::{Clause, Observer, RuleRef, Trace, Unobserved};

/// What policy sees of a connection or a request.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// The peer's identity, with or without `spiffe://`; `None` for plaintext.
    pub principal: Option<&'a str>,
    /// The peer identity's namespace; `None` for plaintext.
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// `None` where HTTP is not parsed (ztunnel; the waypoint's opaque TCP).
    pub http: Option<HttpAttributes<'a>>,
}

/// The HTTP parts of a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// The `Host` (`:authority`), possibly with a port.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The request's token, validated (signature, issuer, audiences, time); `None` when the
    /// request carries none.
    pub auth: Option<&'a RequestAuth>,
}

/// What a validated token says, as policy reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestAuth {
    /// `iss/sub`, Istio's request principal.
    pub principal: String,
    /// The `aud` claim (a string or a list).
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    /// Every claim of the payload.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl RequestAuth {
    /// The string values of the claim at `path` (through nested objects): the claim
    /// itself when it is a string, its strings when it is a list; nothing otherwise.
    pub fn claim(&self, path: &[String]) -> Vec<&str> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut v = self.claims.get(first.as_str());
        for p in rest {
            v = v.and_then(|v| v.get(p.as_str()));
        }
        match v {
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

/// What decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// A DENY rule matched.
    DeniedBy(RuleRef),
    /// An ALLOW rule matched and no DENY did.
    AllowedBy(RuleRef),
    /// No DENY matched and no ALLOW policy applies.
    NoAllowPolicy,
    /// ALLOW policies apply and none matched; their keys, in evaluation order.
    NoAllowMatched(Vec<String>),
}

/// The outcome of evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub decision: Decision,
    /// AUDIT rules that matched, in evaluation order.
    pub audited: Vec<RuleRef>,
}

impl Verdict {
    /// Whether the request may proceed.
    pub fn allowed(&self) -> bool {
        matches!(
            self.decision,
            Decision::AllowedBy(_) | Decision::NoAllowPolicy
        )
    }
}

/// The reason an access log prints: `denied by app/d (rule 0); audited by app/a (rule 0)`.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.decision {
            Decision::DeniedBy(r) => write!(f, "denied by {r}")?,
            Decision::AllowedBy(r) => write!(f, "allowed by {r}")?,
            Decision::NoAllowPolicy => write!(f, "no ALLOW policy applies")?,
            Decision::NoAllowMatched(keys) => {
                write!(f, "no ALLOW policy matched (checked: {})", keys.join(", "))?
            }
        }
        if !self.audited.is_empty() {
            let list: Vec<String> = self.audited.iter().map(ToString::to_string).collect();
            write!(f, "; audited by {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// Evaluates `policies` (those that apply to the destination) for `attrs`.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    attrs: &Attributes<'_>,
) -> Verdict {
    evaluate_observed(policies, attrs, &mut Unobserved)
}

/// [`evaluate`], and the [`Trace`] of every policy, rule and field it looked at: what
/// `ambitctl explain` prints. The trace is recorded by the evaluation itself, so it cannot
/// disagree with the verdict.
pub fn explain<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    attrs: &Attributes<'_>,
) -> (Verdict, Trace) {
    let mut trace = Trace::default();
    let verdict = evaluate_observed(policies, attrs, &mut trace);
    (verdict, trace)
}

/// [`evaluate`], reporting each step to `observer` as it is taken ([`Unobserved`] costs
/// nothing; [`Trace`] records).
pub fn evaluate_observed<'p, O: Observer + ?Sized>(
    policies: impl IntoIterator<Item = &'p Policy>,
    attrs: &Attributes<'_>,
    observer: &mut O,
) -> Verdict {
    let facts = Facts {
        principal: attrs
            .principal
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p)),
        attrs,
    };
    let mut denied = None;
    let mut allowed = None;
    let mut checked = Vec::new();
    let mut audited = Vec::new();
    for p in policies {
        let mut hit = |p: &Policy| {
            p.matching_rule(&facts, &mut *observer).map(|rule| RuleRef {
                policy: p.key(),
                rule,
            })
        };
        match p.action {
            Action::Deny if denied.is_none() => denied = hit(p),
            Action::Deny => {}
            Action::Audit => audited.extend(hit(p)),
            Action::Allow => {
                if allowed.is_none() {
                    allowed = hit(p);
                }
                checked.push(p.key());
            }
        }
    }
    let decision = match (denied, allowed) {
        (Some(r), _) => Decision::DeniedBy(r),
        (None, Some(r)) => Decision::AllowedBy(r),
        (None, None) if checked.is_empty() => Decision::NoAllowPolicy,
        (None, None) => Decision::NoAllowMatched(checked),
    };
    let verdict = Verdict { decision, audited };
    let by = match &verdict.decision {
        Decision::DeniedBy(r) | Decision::AllowedBy(r) => Some(r),
        Decision::NoAllowPolicy | Decision::NoAllowMatched(_) => None,
    };
    observer.decided(verdict.allowed(), by);
    verdict
}

/// The attributes, with the principal in Istio's form.
struct Facts<'a> {
    principal: Option<&'a str>,
    attrs: &'a Attributes<'a>,
}

impl Facts<'_> {
    fn principal(&self) -> String {
        self.principal.unwrap_or("none (plaintext)").to_string()
    }

    fn namespace(&self) -> String {
        self.attrs
            .namespace
            .unwrap_or("none (plaintext)")
            .to_string()
    }
}

impl Policy {
    /// Index of the first rule matching, if any.
    fn matching_rule<O: Observer + ?Sized>(&self, f: &Facts, o: &mut O) -> Option<usize> {
        o.policy(self);
        let http_known = f.attrs.http.is_some();
        for (index, r) in self.rules.iter().enumerate() {
            if self.action == Action::Allow && r.unknowable(http_known) {
                o.rule(index, true);
                o.rule_done(false);
                continue;
            }
            o.rule(index, false);
            let matched = r.matches(f, o);
            o.rule_done(matched);
            if matched {
                return Some(index);
            }
        }
        None
    }
}

/// Checks the fields of one clause, reporting each that constrains.
struct Clauses<'o, 'c, O: ?Sized> {
    o: &'o mut O,
    clause: Clause<'c>,
}

impl<O: Observer + ?Sized> Clauses<'_, '_, O> {
    /// `values` (if any) must match and `not_values` must not; `names` are the two lists'
    /// names as written, `seen` the value the request had.
    fn field<T>(
        &mut self,
        names: (&str, &str),
        (values, not_values): (&[T], &[T]),
        seen: &dyn Fn() -> String,
        hit: impl Fn(&[T]) -> bool,
    ) -> bool {
        if !values.is_empty() {
            let matched = hit(values);
            self.o.check(self.clause, names.0, seen, matched);
            if !matched {
                return false;
            }
        }
        if !not_values.is_empty() {
            let matched = !hit(not_values);
            self.o.check(self.clause, names.1, seen, matched);
            if !matched {
                return false;
            }
        }
        true
    }

    fn set<T>(
        &mut self,
        v: &Values<T>,
        seen: &dyn Fn() -> String,
        hit: impl Fn(&[T]) -> bool,
    ) -> bool {
        self.field(
            ("values", "notValues"),
            (&v.values, &v.not_values),
            seen,
            hit,
        )
    }
}

fn any_str(ms: &[StringMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| ms.iter().any(|m| m.matches(v)))
}

fn any_principal(ms: &[StringMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| ms.iter().any(|m| m.matches_principal(v)))
}

fn any_net(nets: &[IpNet], ip: IpAddr) -> bool {
    // An IPv4 peer seen through an IPv6 socket (`::ffff:a.b.c.d`) is the IPv4 peer: it
    // must match the IPv4 blocks written for it, whichever caller forgot to unmap it.
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// Unknowable parts count as matching here: an ALLOW rule with any never gets here
/// (`Policy::matching_rule`), and a DENY or AUDIT rule must match on the rest.
impl Rule {
    fn matches<O: Observer + ?Sized>(&self, f: &Facts, o: &mut O) -> bool {
        (self.from.is_empty()
            || self.from.iter().enumerate().any(|(i, s)| {
                s.matches(
                    f,
                    &mut Clauses {
                        o: &mut *o,
                        clause: Clause::From(i),
                    },
                )
            }))
            && (self.to.is_empty()
                || self.to.iter().enumerate().any(|(i, op)| {
                    op.matches(
                        f,
                        &mut Clauses {
                            o: &mut *o,
                            clause: Clause::To(i),
                        },
                    )
                }))
            && self.when.iter().enumerate().all(|(i, c)| {
                c.matches(
                    f,
                    &mut Clauses {
                        o: &mut *o,
                        clause: Clause::When(i, c.key()),
                    },
                )
            })
    }
}

impl Source {
    fn matches<O: Observer + ?Sized>(&self, f: &Facts, c: &mut Clauses<'_, '_, O>) -> bool {
        let ip = f.attrs.source_ip;
        let ns = f.attrs.namespace;
        let seen_ip = || ip.to_canonical().to_string();
        c.field(
            ("principals", "notPrincipals"),
            (&self.principals, &self.not_principals),
            &|| f.principal(),
            |m| any_principal(m, f.principal),
        ) && c.field(
            ("namespaces", "notNamespaces"),
            (&self.namespaces, &self.not_namespaces),
            &|| f.namespace(),
            |m| any_str(m, ns),
        ) && c.field(
            ("ipBlocks", "notIpBlocks"),
            (&self.ip_blocks, &self.not_ip_blocks),
            &seen_ip,
            |n| any_net(n, ip),
        ) && c.field(
            ("remoteIpBlocks", "notRemoteIpBlocks"),
            (&self.remote_ip_blocks, &self.not_remote_ip_blocks),
            &seen_ip,
            |n| any_net(n, ip),
        ) && match &f.attrs.http {
            // Without HTTP the token is unknowable; an ALLOW never gets here with a rule
            // on it, and a DENY matches on the rest.
            None => {
                if self.uses_jwt() {
                    c.o.check(
                        c.clause,
                        "requestPrincipals",
                        &|| "unknown (no HTTP)".into(),
                        true,
                    );
                }
                true
            }
            Some(h) => {
                let principal = h.auth.map(|a| a.principal.as_str());
                c.field(
                    ("requestPrincipals", "notRequestPrincipals"),
                    (&self.request_principals, &self.not_request_principals),
                    &|| principal.unwrap_or("none (no token)").to_string(),
                    |m| any_str(m, principal),
                )
            }
        }
    }
}

impl Operation {
    fn matches<O: Observer + ?Sized>(&self, f: &Facts, c: &mut Clauses<'_, '_, O>) -> bool {
        let port = f.attrs.destination_port;
        if !c.field(
            ("ports", "notPorts"),
            (&self.ports, &self.not_ports),
            &|| port.to_string(),
            |ps| ps.contains(&port),
        ) {
            return false;
        }
        let Some(h) = &f.attrs.http else {
            if self.uses_http() {
                // Only a DENY or AUDIT rule gets here (an ALLOW one was skipped as
                // unknowable): it matches on its L4 parts, and the trace says so.
                c.o.check(
                    c.clause,
                    "methods/paths/hosts",
                    &|| "unknown (no HTTP)".into(),
                    true,
                );
            }
            return true;
        };
        // `*` in `methods` means any method; `notMethods` is exact.
        let seen = || h.method.to_string();
        let method_ok = c.field(("methods", ""), (&self.methods, &[]), &seen, |ms| {
            ms.iter().any(|m| m == "*" || m == h.method)
        }) && c.field(("", "notMethods"), (&[], &self.not_methods), &seen, |ms| {
            ms.iter().any(|m| m == h.method)
        });
        // `Host` may carry the port; a pattern may be written with or without it.
        let host = h.host;
        let bare_host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let hosts = |ms: &[StringMatch]| any_str(ms, Some(host)) || any_str(ms, Some(bare_host));
        let path = Some(h.path);
        method_ok
            && c.field(
                ("hosts", "notHosts"),
                (&self.hosts, &self.not_hosts),
                &|| host.to_string(),
                hosts,
            )
            && c.field(
                ("paths", "notPaths"),
                (&self.paths, &self.not_paths),
                &|| h.path.to_string(),
                |m| any_str(m, path),
            )
    }
}

impl Condition {
    fn matches<O: Observer + ?Sized>(&self, f: &Facts, c: &mut Clauses<'_, '_, O>) -> bool {
        let a = f.attrs;
        match self.test() {
            Test::SourceIp(v) => c.set(v, &|| a.source_ip.to_string(), |n| any_net(n, a.source_ip)),
            Test::DestinationIp(v) => c.set(v, &|| a.destination_ip.to_string(), |n| {
                any_net(n, a.destination_ip)
            }),
            Test::DestinationPort(v) => c.set(v, &|| a.destination_port.to_string(), |ps| {
                ps.contains(&a.destination_port)
            }),
            Test::SourceNamespace(v) => c.set(v, &|| f.namespace(), |m| any_str(m, a.namespace)),
            Test::SourcePrincipal(v) => {
                c.set(v, &|| f.principal(), |m| any_principal(m, f.principal))
            }
            Test::RequestHeader { name, values } => match &a.http {
                Some(h) => {
                    // Repeated headers are one value, joined as HTTP allows; an absent
                    // header is the empty value, which only an empty pattern matches.
                    let joined = h
                        .headers
                        .get_all(name.as_str())
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect::<Vec<_>>()
                        .join(",");
                    c.set(values, &|| joined.clone(), |m| any_str(m, Some(&joined)))
                }
                None => {
                    c.o.check(c.clause, "values", &|| "unknown (no HTTP)".into(), true);
                    true
                }
            },
            Test::RequestPrincipal(v) => auth_test(c, a, v, |au| vec![au.principal.as_str()]),
            Test::RequestAudiences(v) => auth_test(c, a, v, |au| {
                au.audiences.iter().map(String::as_str).collect()
            }),
            Test::RequestPresenter(v) => {
                auth_test(c, a, v, |au| au.presenter.as_deref().into_iter().collect())
            }
            Test::RequestClaim { path, values } => auth_test(c, a, values, |au| au.claim(path)),
            Test::Unknown => {
                c.o.check(c.clause, "values", &|| "unknowable".into(), true);
                true
            }
        }
    }
}

/// A `request.auth.*` condition: any of the token's values for the key must match
/// `values` and none `not_values`; a request without a token has no values. Without HTTP
/// the token is unknowable, which counts as matching here as for the other parts.
fn auth_test<'a, O: Observer + ?Sized>(
    c: &mut Clauses<'_, '_, O>,
    a: &'a Attributes<'a>,
    v: &Values<StringMatch>,
    of: impl Fn(&'a RequestAuth) -> Vec<&'a str>,
) -> bool {
    let Some(h) = &a.http else {
        c.o.check(c.clause, "values", &|| "unknown (no HTTP)".into(), true);
        return true;
    };
    let got = h.auth.map(of).unwrap_or_default();
    c.set(
        v,
        &|| match h.auth {
            Some(_) => format!("{got:?}"),
            None => "none (no token)".into(),
        },
        |ms| got.iter().any(|g| ms.iter().any(|m| m.matches(g))),
    )
}
