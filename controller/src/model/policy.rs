//! Conversion of policies and routes: `AuthorizationPolicy` to the shared engine's
//! [`ambit_policy::Policy`] (scope, targets, rules with parsed patterns, ports, CIDRs and
//! conditions; its wire form is the engine's too), `HTTPRoute` and `GRPCRoute` to `Route`,
//! `TrafficPolicy` to its wire form.
//!
//! Every value that the proxies would otherwise have to parse (patterns, ports, CIDRs,
//! condition values, durations) is checked here, so a typo is reported against the object
//! and field that holds it and that object is rejected, rather than a proxy NACKing a
//! whole push.

use std::collections::{BTreeMap, HashMap};

use ambit_policy::{
    Action as PolicyAction, Condition, Operation, Policy as Authorization, Rule, Scope, Source,
    StringMatch,
};
use ambit_proto::discovery::{LoadBalancing, Route, TrafficPolicy as WireTrafficPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{selects, typed, FieldError, Kind, ModelConfig, ModelError, Store};
use crate::crd::gateway::{BackendRef, HttpRouteFilter};
use crate::crd::security::{self, Action, AuthorizationPolicySpec};
use crate::crd::traffic::{SimpleLb, TrafficPolicySpec};

/// A converted authorization policy and how it selects workloads.
pub(super) struct Policy {
    pub policy: Authorization,
    /// Labels for selector-scoped policies; `None` for namespace, global or targeted ones.
    selector: Option<BTreeMap<String, String>>,
}

/// The valid authorization policies.
pub(super) struct Authorizations {
    pub policies: Vec<Policy>,
    root_namespace: String,
}

impl Authorizations {
    /// `namespace/name` of the selector-scoped policies that select a workload. A policy
    /// in the root namespace selects across every namespace, as in Istio.
    pub fn selecting(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let mut out: Vec<String> = self
            .policies
            .iter()
            .filter(|p| {
                &*p.policy.namespace == namespace || *p.policy.namespace == self.root_namespace
            })
            .filter(|p| p.selector.as_ref().is_some_and(|s| selects(s, labels)))
            .map(|p| p.policy.key())
            .collect();
        out.sort();
        out
    }
}

/// A selector-scoped policy's key and selector.
pub(super) type SelectorPolicy = (String, BTreeMap<String, String>);

impl Authorizations {
    /// The selector-scoped policies of each namespace, in the order [`Self::selecting`]
    /// meets them: all a workload's `authorization_policies` depend on (with the root
    /// namespace's, which select in every namespace).
    pub fn selectors(&self) -> BTreeMap<String, Vec<SelectorPolicy>> {
        let mut out: BTreeMap<String, Vec<SelectorPolicy>> = BTreeMap::new();
        for p in &self.policies {
            if let Some(selector) = &p.selector {
                out.entry(p.policy.namespace.to_string())
                    .or_default()
                    .push((p.policy.key(), selector.clone()));
            }
        }
        out
    }

    /// The namespace whose selector policies select in every namespace.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }
}

/// Name and namespace of an object, or `None` when it has no name.
fn names(meta: &ObjectMeta) -> Option<(String, String)> {
    let name = meta.name.clone()?;
    Some((
        meta.namespace
            .clone()
            .unwrap_or_else(|| super::DEFAULT_NAMESPACE.into()),
        name,
    ))
}

/// Converts every `AuthorizationPolicy`; invalid ones are reported and left out.
pub(super) fn authorizations(
    store: &Store,
    config: &ModelConfig,
    errors: &mut Vec<ModelError>,
) -> Authorizations {
    let mut policies = Vec::new();
    for ap in typed!(store, AuthorizationPolicy) {
        let Some((namespace, name)) = names(&ap.metadata) else {
            continue;
        };
        match convert_authorization(&ap.spec, &namespace, &name, config) {
            Ok((p, None)) => policies.push(p),
            Ok((p, Some((field, reason)))) => match fail_closed(p) {
                Some((p, enforced)) => {
                    errors.push(ModelError::PolicyFailedClosed {
                        namespace,
                        name,
                        field,
                        reason,
                        enforced,
                    });
                    policies.push(p);
                }
                None => errors.push(ModelError::Rejected {
                    kind: Kind::AuthorizationPolicy,
                    namespace,
                    name,
                    field,
                    reason,
                }),
            },
            Err((field, reason)) => errors.push(ModelError::Rejected {
                kind: Kind::AuthorizationPolicy,
                namespace,
                name,
                field,
                reason,
            }),
        }
    }
    Authorizations {
        policies,
        root_namespace: config.root_namespace.clone(),
    }
}

type FieldResult<T> = Result<T, (String, FieldError)>;

/// What stands in for a policy whose rules are invalid, so a typo never opens traffic:
/// an ALLOW keeps its place but matches nothing (its workloads then accept only what
/// another ALLOW permits), a DENY matches everything it selects. An AUDIT policy
/// enforces nothing, so it is simply dropped (`None`).
fn fail_closed(mut p: Policy) -> Option<(Policy, &'static str)> {
    let enforced = match p.policy.action {
        PolicyAction::Allow => {
            p.policy.rules = Vec::new();
            "an ALLOW that matches nothing"
        }
        PolicyAction::Deny => {
            p.policy.rules = vec![Rule::default()];
            "a DENY of all traffic it selects"
        }
        PolicyAction::Audit => return None,
    };
    Some((p, enforced))
}

/// Converts one policy. `Err` when it cannot be placed (bad target); otherwise the policy
/// and, when one of its rules is invalid, that rule's error (the rules are then empty).
fn convert_authorization(
    spec: &AuthorizationPolicySpec,
    namespace: &str,
    name: &str,
    config: &ModelConfig,
) -> FieldResult<(Policy, Option<(String, FieldError)>)> {
    let mut target_gateway = None;
    let mut target_service = None;
    for (i, t) in spec.target_refs.iter().enumerate() {
        let field = format!("spec.targetRefs[{i}]");
        let slot = match (t.group.as_str(), t.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => {
                (&mut target_gateway, format!("{namespace}/{}", t.name))
            }
            ("" | "core", "Service") => (
                &mut target_service,
                format!(
                    "{namespace}/{}",
                    config.service_hostname(&t.name, namespace)
                ),
            ),
            // Egress through a waypoint: the waypoint keys an external service by its
            // namespace and name (it has no one hostname).
            ("networking.ambit.dev", "ExternalService") => {
                (&mut target_service, format!("{namespace}/{}", t.name))
            }
            (g, k) => {
                return Err((
                    field,
                    FieldError::Invalid(format!(
                        "cannot target {k} in group {g:?}; only Gateway, Service and \
                         ExternalService (networking.ambit.dev)"
                    )),
                ))
            }
        };
        if slot.0.is_some() {
            return Err((
                field,
                FieldError::Invalid("only one target of each kind is supported".into()),
            ));
        }
        *slot.0 = Some(slot.1.into());
    }
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|s| !s.is_empty());
    let targeted = !spec.target_refs.is_empty();
    let scope = if targeted || selector.is_some() {
        Scope::WorkloadSelector
    } else if namespace == config.root_namespace {
        Scope::Global
    } else {
        Scope::Namespace
    };
    // Placement errors (above) reject the policy: there is nowhere to enforce it. Rule
    // errors are returned beside the policy so the caller can fail closed.
    let (rules, invalid) = match spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| convert_rule(r, &format!("spec.rules[{i}]")))
        .collect::<FieldResult<Vec<_>>>()
    {
        Ok(rules) => (rules, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let policy = Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action: match spec.action {
            Action::Allow => PolicyAction::Allow,
            Action::Deny => PolicyAction::Deny,
            Action::Audit => PolicyAction::Audit,
        },
        rules,
        target_gateway,
        target_service,
    };
    // A targeted policy belongs to the waypoint; it selects no workloads for ztunnel.
    Ok((
        Policy {
            policy,
            selector: if targeted { None } else { selector },
        },
        invalid,
    ))
}

fn convert_rule(rule: &security::Rule, at: &str) -> FieldResult<Rule> {
    let from = rule
        .from
        .iter()
        .enumerate()
        .map(|(j, f)| convert_source(&f.source, &format!("{at}.from[{j}].source")))
        .collect::<FieldResult<Vec<_>>>()?;
    let to = rule
        .to
        .iter()
        .enumerate()
        .map(|(j, t)| convert_operation(&t.operation, &format!("{at}.to[{j}].operation")))
        .collect::<FieldResult<Vec<_>>>()?;
    let mut when = Vec::new();
    for (j, c) in rule.when.iter().enumerate() {
        if c.key.is_empty() {
            return Err((
                format!("{at}.when[{j}].key"),
                FieldError::Invalid("must not be empty".into()),
            ));
        }
        if !condition_key_known(&c.key) {
            return Err((
                format!("{at}.when[{j}].key"),
                FieldError::Invalid(format!(
                    "unsupported condition key {:?} (known: {})",
                    c.key, CONDITION_KEYS
                )),
            ));
        }
        let condition = Condition::parse(c.key.clone(), c.values.clone(), c.not_values.clone())
            .map_err(|e| {
                let list = if e.list == "values" {
                    "values"
                } else {
                    "notValues"
                };
                (
                    format!("{at}.when[{j}].{list}[{}]", e.index),
                    FieldError::Invalid(format!(
                        "{:?} is not a value of {}: {}",
                        e.value, e.key, e.why
                    )),
                )
            })?;
        when.push(condition);
    }
    Ok(Rule { from, to, when })
}

/// The condition keys the proxies evaluate, for the error message.
const CONDITION_KEYS: &str = "source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, request.headers[<name>], request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[<name>]...";

/// Whether a condition key is one the proxies know. The waypoint refuses a whole push that
/// carries a policy with any other key, so such a policy is failed closed here instead.
/// `request.auth.*` keys are the engine's to resolve (claim paths such as `[a][b]`).
fn condition_key_known(key: &str) -> bool {
    (key.starts_with("request.headers[") && key.ends_with(']'))
        || (key.starts_with("request.auth.")
            && Condition::parse(key, Vec::new(), Vec::new())
                .is_ok_and(|c| !matches!(c.test(), ambit_policy::Test::Unknown)))
        || matches!(
            key,
            "source.ip"
                | "remote.ip"
                | "source.namespace"
                | "source.principal"
                | "destination.ip"
                | "destination.port"
        )
}

fn convert_source(s: &security::Source, at: &str) -> FieldResult<Source> {
    let blocks = |v: &[String], field: &str| -> FieldResult<Vec<ipnet::IpNet>> {
        v.iter()
            .enumerate()
            .map(|(k, b)| ip_block(b).map_err(|e| (format!("{at}.{field}[{k}]"), e)))
            .collect()
    };
    let patterns = |v: &[String], field: &str| matches(v, &format!("{at}.{field}"));
    Ok(Source {
        principals: patterns(&s.principals, "principals")?,
        not_principals: patterns(&s.not_principals, "notPrincipals")?,
        namespaces: patterns(&s.namespaces, "namespaces")?,
        not_namespaces: patterns(&s.not_namespaces, "notNamespaces")?,
        ip_blocks: blocks(&s.ip_blocks, "ipBlocks")?,
        not_ip_blocks: blocks(&s.not_ip_blocks, "notIpBlocks")?,
        request_principals: patterns(&s.request_principals, "requestPrincipals")?,
        not_request_principals: patterns(&s.not_request_principals, "notRequestPrincipals")?,
        remote_ip_blocks: blocks(&s.remote_ip_blocks, "remoteIpBlocks")?,
        not_remote_ip_blocks: blocks(&s.not_remote_ip_blocks, "notRemoteIpBlocks")?,
    })
}

fn convert_operation(o: &security::Operation, at: &str) -> FieldResult<Operation> {
    let ports = |v: &[String], field: &str| -> FieldResult<Vec<u16>> {
        v.iter()
            .enumerate()
            .map(|(k, p)| match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err((format!("{at}.{field}[{k}]"), FieldError::Port(p.clone()))),
            })
            .collect()
    };
    let patterns = |v: &[String], field: &str| matches(v, &format!("{at}.{field}"));
    Ok(Operation {
        ports: ports(&o.ports, "ports")?,
        not_ports: ports(&o.not_ports, "notPorts")?,
        hosts: patterns(&o.hosts, "hosts")?,
        not_hosts: patterns(&o.not_hosts, "notHosts")?,
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: patterns(&o.paths, "paths")?,
        not_paths: patterns(&o.not_paths, "notPaths")?,
    })
}

/// Istio's pattern syntax, parsed by the shared engine (which refuses a `*` that is not
/// at one end, such as `*x*`).
fn matches(v: &[String], at: &str) -> FieldResult<Vec<StringMatch>> {
    v.iter()
        .enumerate()
        .map(|(k, s)| {
            StringMatch::parse(s)
                .map_err(|e| (format!("{at}[{k}]"), FieldError::Invalid(e.to_string())))
        })
        .collect()
}

/// `10.0.0.0/8`, `fd00::/8`, or a bare address (a host route).
pub(super) fn ip_block(s: &str) -> Result<ipnet::IpNet, FieldError> {
    let s = s.trim();
    if s.contains('/') {
        let net: ipnet::IpNet = s.parse().map_err(|source| FieldError::Cidr {
            value: s.to_string(),
            source,
        })?;
        Ok(net.trunc())
    } else {
        let ip: std::net::IpAddr = s.parse().map_err(|source| FieldError::Ip {
            value: s.to_string(),
            source,
        })?;
        Ok(ipnet::IpNet::from(ip))
    }
}

/// Parses a Go-style duration (`1h30m`, `10s`, `250ms`, `1.5s`) into seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, FieldError> {
    let bad = || FieldError::Duration(s.to_string());
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

fn check_duration(v: Option<&String>, field: String) -> FieldResult<()> {
    match v {
        Some(d) => parse_duration(d).map(|_| ()).map_err(|e| (field, e)),
        None => Ok(()),
    }
}

fn check_percent(v: f64, field: String) -> FieldResult<()> {
    if (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        Err((
            field,
            FieldError::Range {
                value: v,
                min: 0.0,
                max: 100.0,
            },
        ))
    }
}

/// The load-balancing hint per Service `(namespace, name)`, from valid TrafficPolicies.
pub(super) fn load_balancing(store: &Store) -> HashMap<(String, String), LoadBalancing> {
    let mut out = HashMap::new();
    for tp in typed!(store, TrafficPolicy) {
        let Some((namespace, _)) = names(&tp.metadata) else {
            continue;
        };
        if check_traffic_policy(&tp.spec).is_err() {
            continue;
        }
        let simple = tp.spec.load_balancer.as_ref().and_then(|l| l.simple);
        if let Some(simple) = simple {
            let lb = match simple {
                SimpleLb::RoundRobin => LoadBalancing::RoundRobin,
                SimpleLb::LeastRequest => LoadBalancing::LeastConnections,
                SimpleLb::Random => LoadBalancing::Random,
            };
            out.insert((namespace, tp.spec.target_ref.name.clone()), lb);
        }
    }
    out
}

fn check_traffic_policy(spec: &TrafficPolicySpec) -> FieldResult<()> {
    let t = &spec.target_ref;
    if t.kind != "Service" || !matches!(t.group.as_str(), "" | "core") {
        return Err((
            "spec.targetRef".into(),
            FieldError::Invalid(format!("must be a Service, not {} {:?}", t.kind, t.group)),
        ));
    }
    if let Some(o) = &spec.outlier_detection {
        check_duration(o.interval.as_ref(), "spec.outlierDetection.interval".into())?;
        check_duration(
            o.base_ejection_time.as_ref(),
            "spec.outlierDetection.baseEjectionTime".into(),
        )?;
        if let Some(p) = o.max_ejection_percent {
            check_percent(
                f64::from(p),
                "spec.outlierDetection.maxEjectionPercent".into(),
            )?;
        }
    }
    if let Some(r) = &spec.rate_limit {
        check_duration(Some(&r.fill_interval), "spec.rateLimit.fillInterval".into())?;
    }
    if let Some(f) = &spec.fault_injection {
        if let Some(d) = &f.delay {
            check_duration(
                Some(&d.fixed_delay),
                "spec.faultInjection.delay.fixedDelay".into(),
            )?;
            check_percent(d.percentage, "spec.faultInjection.delay.percentage".into())?;
        }
        if let Some(a) = &f.abort {
            if !(200..=599).contains(&a.http_status) {
                return Err((
                    "spec.faultInjection.abort.httpStatus".into(),
                    FieldError::Range {
                        value: f64::from(a.http_status),
                        min: 200.0,
                        max: 599.0,
                    },
                ));
            }
            check_percent(a.percentage, "spec.faultInjection.abort.percentage".into())?;
        }
    }
    Ok(())
}

/// Converts every `TrafficPolicy`; invalid ones are reported and left out.
pub(super) fn traffic_policies(
    store: &Store,
    config: &ModelConfig,
    errors: &mut Vec<ModelError>,
) -> Vec<WireTrafficPolicy> {
    let mut out = Vec::new();
    for tp in typed!(store, TrafficPolicy) {
        let Some((namespace, name)) = names(&tp.metadata) else {
            continue;
        };
        let spec_json = check_traffic_policy(&tp.spec).and_then(|()| {
            serde_json::to_string(&tp.spec)
                .map_err(|e| ("spec".into(), FieldError::Invalid(e.to_string())))
        });
        match spec_json {
            Ok(spec_json) => out.push(WireTrafficPolicy {
                target_service: format!(
                    "{namespace}/{}",
                    config.service_hostname(&tp.spec.target_ref.name, &namespace)
                ),
                name,
                namespace,
                spec_json,
            }),
            Err((field, reason)) => errors.push(ModelError::Rejected {
                kind: Kind::TrafficPolicy,
                namespace,
                name,
                field,
                reason,
            }),
        }
    }
    out
}

fn check_filters(filters: &[HttpRouteFilter], at: &str) -> FieldResult<()> {
    for (i, f) in filters.iter().enumerate() {
        if let Some(m) = &f.request_mirror {
            if let Some(p) = m.percent {
                check_percent(f64::from(p), format!("{at}[{i}].requestMirror.percent"))?;
            }
        }
    }
    Ok(())
}

fn check_backends(backends: &[BackendRef], at: &str) -> FieldResult<()> {
    for (i, b) in backends.iter().enumerate() {
        if !matches!(b.kind.as_deref(), None | Some("Service")) {
            return Err((
                format!("{at}[{i}].kind"),
                FieldError::Invalid("only Service backends are supported".into()),
            ));
        }
        check_filters(&b.filters, &format!("{at}[{i}].filters"))?;
    }
    Ok(())
}

/// Converts every HTTPRoute and GRPCRoute attached to Services. Routes attached only to
/// Gateways are not for waypoints and are skipped.
pub(super) fn routes(
    store: &Store,
    config: &ModelConfig,
    errors: &mut Vec<ModelError>,
) -> Vec<Route> {
    let mut out: BTreeMap<(String, String), Route> = BTreeMap::new();
    let parents = |refs: &[crate::crd::gateway::ParentReference], ns: &str| -> Vec<String> {
        let mut v: Vec<String> = refs
            .iter()
            .filter(|p| p.is_service())
            .map(|p| {
                let pns = p.namespace.as_deref().unwrap_or(ns);
                format!("{pns}/{}", config.service_hostname(&p.name, pns))
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    for r in typed!(store, HttpRoute) {
        let Some((namespace, name)) = names(&r.metadata) else {
            continue;
        };
        let checked = r.spec.rules.iter().enumerate().try_for_each(|(i, rule)| {
            let at = format!("spec.rules[{i}]");
            check_filters(&rule.filters, &format!("{at}.filters"))?;
            check_backends(&rule.backend_refs, &format!("{at}.backendRefs"))?;
            if let Some(t) = &rule.timeouts {
                check_duration(t.request.as_ref(), format!("{at}.timeouts.request"))?;
                check_duration(
                    t.backend_request.as_ref(),
                    format!("{at}.timeouts.backendRequest"),
                )?;
            }
            if let Some(rt) = &rule.retry {
                check_duration(rt.backoff.as_ref(), format!("{at}.retry.backoff"))?;
            }
            Ok(())
        });
        let parent_services = parents(&r.spec.parent_refs, &namespace);
        push_route(
            &mut out,
            errors,
            Kind::HttpRoute,
            namespace,
            name,
            parent_services,
            checked,
            &r.spec,
        );
    }
    for r in typed!(store, GrpcRoute) {
        let Some((namespace, name)) = names(&r.metadata) else {
            continue;
        };
        let checked = r.spec.rules.iter().enumerate().try_for_each(|(i, rule)| {
            let at = format!("spec.rules[{i}]");
            check_filters(&rule.filters, &format!("{at}.filters"))?;
            check_backends(&rule.backend_refs, &format!("{at}.backendRefs"))
        });
        let parent_services = parents(&r.spec.parent_refs, &namespace);
        push_route(
            &mut out,
            errors,
            Kind::GrpcRoute,
            namespace,
            name,
            parent_services,
            checked,
            &r.spec,
        );
    }
    out.into_values().collect()
}

#[allow(clippy::too_many_arguments)]
fn push_route<S: serde::Serialize>(
    out: &mut BTreeMap<(String, String), Route>,
    errors: &mut Vec<ModelError>,
    kind: Kind,
    namespace: String,
    name: String,
    parent_services: Vec<String>,
    checked: FieldResult<()>,
    spec: &S,
) {
    let reject = |field: String, reason: FieldError| ModelError::Rejected {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
        field,
        reason,
    };
    if let Err((field, reason)) = checked {
        errors.push(reject(field, reason));
        return;
    }
    if parent_services.is_empty() {
        return;
    }
    // Routes share one key space (`namespace/name`) on the wire; the first kind wins.
    if out.contains_key(&(namespace.clone(), name.clone())) {
        errors.push(reject(
            "metadata.name".into(),
            FieldError::Invalid("an HTTPRoute of the same name already exists".into()),
        ));
        return;
    }
    let spec_json = match serde_json::to_string(spec) {
        Ok(j) => j,
        Err(e) => {
            errors.push(reject("spec".into(), FieldError::Invalid(e.to_string())));
            return;
        }
    };
    out.insert(
        (namespace.clone(), name.clone()),
        Route {
            kind: kind.name().to_string(),
            parent_services,
            spec_json,
            name,
            namespace,
        },
    );
}
