//! State from a YAML (or JSON) file: for tests, and for running ztunnel without a controller.
//!
//! The file is turned into the same full-state [`Push`](pb::Push) the controller would send,
//! so it goes through exactly the conversion and store code that production uses. Errors
//! name the field and line (`workloads[0].addresses[1]: invalid IP address syntax at line 9
//! column 9`); the few checks that need several fields at once name the item instead.
//!
//! # Schema
//!
//! Field names are camelCase; everything but names, namespaces and addresses is optional.
//! String matches use Istio's spelling: `exact`, `prefix*`, `*suffix`, `*` (any value); a
//! `*` anywhere else is refused.
//!
//! ```yaml
//! workloads:
//!   - name: web-0               # uid defaults to "namespace/name"
//!     namespace: default
//!     serviceAccount: web        # default "default"
//!     node: node-1
//!     addresses: [10.0.1.5]
//!     protocol: HBONE            # HBONE (enrolled, the default) or TCP
//!     labels: {app: web}
//!     authorizationPolicies: [default/allow-api]
//!     zone: zone-a
//!     outboundPolicy: REGISTRY_ONLY  # ALLOW_ANY (default) or REGISTRY_ONLY
//!   - name: waypoint-0
//!     namespace: default
//!     serviceAccount: waypoint
//!     node: node-2
//!     addresses: [10.0.2.9]
//!     isWaypoint: true
//! services:
//!   - name: web
//!     namespace: default        # hostname defaults to web.default.svc.cluster.local
//!     vips: [10.96.0.10]
//!     ports: [{port: 80, targetPort: 8080}]
//!     endpoints:
//!       - workloadUid: default/web-0   # must name a workload of the file
//!         ready: true                  # default true
//!     waypoint: {address: 10.0.2.9, identity: "spiffe://cluster.local/ns/default/sa/waypoint"}
//!     loadBalancing: LEAST_CONNECTIONS # RANDOM (default), LEAST_CONNECTIONS, ROUND_ROBIN
//! policies:
//!   - name: allow-api
//!     namespace: default
//!     scope: WORKLOAD_SELECTOR    # WORKLOAD_SELECTOR, NAMESPACE (default), GLOBAL
//!     action: ALLOW               # ALLOW (default), DENY, AUDIT
//!     rules:
//!       - from: [{principals: ["cluster.local/ns/api/sa/*"], notIpBlocks: [10.9.0.0/16]}]
//!         to: [{ports: [8080]}]
//!         when: [{key: source.namespace, values: [api]}]
//! peerAuthentications:
//!   - name: strict
//!     namespace: default
//!     mode: STRICT                # UNSET (default), DISABLE, PERMISSIVE, STRICT
//!   - name: web-metrics
//!     namespace: default
//!     selector: {app: web}        # scope WORKLOAD_SELECTOR when a selector is given,
//!     portLevelMtls: {9090: PERMISSIVE}  # else NAMESPACE (or scope: GLOBAL, the mesh)
//! externalServices:
//!   - name: api
//!     namespace: default
//!     hosts: [api.example.com]
//!     addresses: [192.0.2.0/24]
//!     ports: [{number: 443, name: https, protocol: HTTPS}]
//!     resolution: STATIC          # NONE (default), STATIC, DNS
//!     endpoints: [{address: 198.51.100.7, ports: {https: 8443}}]
//!     vips: [{host: api.example.com, address: 240.240.1.2}]  # as the controller allocates
//!     waypoint: {address: 10.0.2.9, identity: "spiffe://cluster.local/ns/default/sa/waypoint"}  # optional
//! ```
//!
//! `ztunnel/examples/static-state.yaml` is a complete example.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ambit_hbone::identity::{Identity, DEFAULT_TRUST_DOMAIN};
use ambit_proto::discovery as pb;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::external::ExternalService;
use super::service::Service;
use super::workload::Workload;
use super::{ip_to_bytes, ConvertError};
use super::{parse_ip_net, Authorization, MtlsMode, PeerAuthentication, StringMatch};

/// Why a static state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StaticFileError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML for the schema; the message names the field, line and column.
    #[error("{origin}: {source}")]
    Syntax {
        origin: String,
        #[source]
        source: serde_yaml::Error,
    },
    /// An item is well-formed but not valid (an identity that cannot be built, a port
    /// listed twice...).
    #[error("{origin}: {item}: {source}")]
    Invalid {
        origin: String,
        item: String,
        #[source]
        source: Box<ConvertError>,
    },
    /// An endpoint names a workload uid the file does not define.
    #[error("{origin}: {item}.workloadUid {uid:?}: no workload of the file has this uid")]
    UnknownWorkload {
        origin: String,
        item: String,
        uid: String,
    },
}

// ---- the schema ------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    #[serde(default)]
    workloads: Vec<WorkloadDoc>,
    #[serde(default)]
    services: Vec<ServiceDoc>,
    #[serde(default)]
    policies: Vec<PolicyDoc>,
    #[serde(default)]
    peer_authentications: Vec<PeerAuthDoc>,
    #[serde(default)]
    external_services: Vec<ExternalDoc>,
    /// PEM root certificates.
    #[serde(default)]
    trust_roots: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadDoc {
    uid: Option<String>,
    name: String,
    #[serde(deserialize_with = "k8s_name")]
    namespace: String,
    #[serde(default, deserialize_with = "opt_k8s_name")]
    service_account: Option<String>,
    trust_domain: Option<String>,
    #[serde(default)]
    node: String,
    addresses: Vec<IpAddr>,
    #[serde(default)]
    protocol: ProtocolDoc,
    waypoint: Option<GatewayDoc>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    is_waypoint: bool,
    #[serde(default)]
    outbound_policy: OutboundDoc,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum OutboundDoc {
    #[default]
    AllowAny,
    RegistryOnly,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExternalDoc {
    name: String,
    #[serde(deserialize_with = "k8s_name")]
    namespace: String,
    hosts: Vec<String>,
    #[serde(default, deserialize_with = "cidrs")]
    addresses: Vec<IpNet>,
    ports: Vec<ExternalPortDoc>,
    #[serde(default)]
    resolution: ResolutionDoc,
    #[serde(default)]
    endpoints: Vec<ExternalEndpointDoc>,
    /// As the controller allocates them.
    #[serde(default)]
    vips: Vec<ExternalVipDoc>,
    waypoint: Option<GatewayDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExternalVipDoc {
    host: String,
    address: IpAddr,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExternalPortDoc {
    number: u32,
    #[serde(default)]
    name: String,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    target_port: u32,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ResolutionDoc {
    #[default]
    None,
    Static,
    Dns,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExternalEndpointDoc {
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, u32>,
}

impl From<ExternalDoc> for pb::ExternalService {
    fn from(x: ExternalDoc) -> Self {
        pb::ExternalService {
            name: x.name,
            namespace: x.namespace,
            hosts: x.hosts,
            addresses: blocks(&x.addresses),
            ports: x
                .ports
                .into_iter()
                .map(|p| pb::ExternalPort {
                    number: p.number,
                    name: p.name,
                    protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                    target_port: p.target_port,
                    // The waypoint originates TLS; ztunnel never does.
                    tls: None,
                })
                .collect(),
            resolution: match x.resolution {
                ResolutionDoc::None => pb::ExternalResolution::None,
                ResolutionDoc::Static => pb::ExternalResolution::Static,
                ResolutionDoc::Dns => pb::ExternalResolution::Dns,
            } as i32,
            endpoints: x
                .endpoints
                .into_iter()
                .map(|e| pb::ExternalEndpoint {
                    address: e.address,
                    ports: e.ports.into_iter().collect(),
                })
                .collect(),
            vips: x
                .vips
                .into_iter()
                .map(|v| pb::ExternalVip {
                    host: v.host,
                    address: ip_to_bytes(v.address),
                })
                .collect(),
            waypoint: x.waypoint.map(gateway),
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ProtocolDoc {
    #[default]
    Hbone,
    Tcp,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GatewayDoc {
    address: IpAddr,
    #[serde(default)]
    hbone_port: u16,
    identity: Identity,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceDoc {
    name: String,
    #[serde(deserialize_with = "k8s_name")]
    namespace: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    vips: Vec<IpAddr>,
    #[serde(default)]
    ports: Vec<PortDoc>,
    #[serde(default)]
    endpoints: Vec<EndpointDoc>,
    waypoint: Option<GatewayDoc>,
    #[serde(default)]
    load_balancing: LbDoc,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortDoc {
    port: u16,
    #[serde(default)]
    target_port: u16,
    #[serde(default)]
    name: String,
    #[serde(default)]
    app_protocol: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EndpointDoc {
    workload_uid: String,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum LbDoc {
    #[default]
    Random,
    LeastConnections,
    RoundRobin,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyDoc {
    name: String,
    #[serde(deserialize_with = "k8s_name")]
    namespace: String,
    #[serde(default)]
    scope: ScopeDoc,
    #[serde(default)]
    action: ActionDoc,
    #[serde(default)]
    rules: Vec<RuleDoc>,
    #[serde(default)]
    target_gateway: String,
    #[serde(default)]
    target_service: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerAuthDoc {
    name: String,
    #[serde(deserialize_with = "k8s_name")]
    namespace: String,
    /// Default: WORKLOAD_SELECTOR with a selector, else NAMESPACE.
    scope: Option<ScopeDoc>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    mode: MtlsMode,
    #[serde(default)]
    port_level_mtls: BTreeMap<u16, MtlsMode>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ScopeDoc {
    WorkloadSelector,
    #[default]
    Namespace,
    Global,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ActionDoc {
    #[default]
    Allow,
    Deny,
    Audit,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleDoc {
    #[serde(default)]
    from: Vec<SourceDoc>,
    #[serde(default)]
    to: Vec<OperationDoc>,
    #[serde(default)]
    when: Vec<ConditionDoc>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct SourceDoc {
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    #[serde(deserialize_with = "cidrs")]
    ip_blocks: Vec<IpNet>,
    #[serde(deserialize_with = "cidrs")]
    not_ip_blocks: Vec<IpNet>,
    #[serde(deserialize_with = "cidrs")]
    remote_ip_blocks: Vec<IpNet>,
    #[serde(deserialize_with = "cidrs")]
    not_remote_ip_blocks: Vec<IpNet>,
    request_principals: Vec<StringMatch>,
    not_request_principals: Vec<StringMatch>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct OperationDoc {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    hosts: Vec<StringMatch>,
    not_hosts: Vec<StringMatch>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<StringMatch>,
    not_paths: Vec<StringMatch>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionDoc {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// Deserializes a string through `check` inside the visitor, so that serde_yaml reports the
/// error at the scalar itself (field path and line), not at the enclosing item.
fn checked_str<'de, D, T>(
    d: D,
    what: &'static str,
    check: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T> {
        what: &'static str,
        check: fn(&str) -> Result<T, String>,
    }
    impl<T> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.what)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            (self.check)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V { what, check })
}

/// A Kubernetes name usable in an identity (namespaces, service accounts).
fn check_name(s: &str) -> Result<String, String> {
    Identity::new(DEFAULT_TRUST_DOMAIN, s, "default")
        .map(|_| s.to_string())
        .map_err(|_| {
            format!(
                "{s:?} is not a Kubernetes name (lowercase letters, digits, '-' and '.', \
                 starting and ending with a letter or digit)"
            )
        })
}

fn k8s_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked_str(d, "a Kubernetes name", check_name)
}

fn opt_k8s_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    k8s_name(d).map(Some)
}

/// An address or CIDR, in a list.
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "an IP address or CIDR", |s| {
            parse_ip_net(s)
                .map(Cidr)
                .ok_or_else(|| format!("{s:?} is not an IP address or CIDR"))
        })
    }
}

fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<Cidr>::deserialize(d)?
        .into_iter()
        .map(|c| c.0)
        .collect())
}

// ---- to protobuf -----------------------------------------------------------------------

fn gateway(g: GatewayDoc) -> pb::GatewayAddress {
    pb::GatewayAddress {
        address: ip_to_bytes(g.address),
        hbone_port: u32::from(g.hbone_port),
        identity: g.identity.to_string(),
    }
}

fn string_matches(patterns: &[StringMatch]) -> Vec<pb::StringMatch> {
    use pb::string_match::Match;
    patterns
        .iter()
        .map(|p| pb::StringMatch {
            r#match: Some(match p {
                StringMatch::Exact(s) => Match::Exact(s.to_string()),
                StringMatch::Prefix(s) => Match::Prefix(s.to_string()),
                StringMatch::Suffix(s) => Match::Suffix(s.to_string()),
                StringMatch::Presence => Match::Presence(true),
            }),
        })
        .collect()
}

fn blocks(nets: &[IpNet]) -> Vec<pb::IpBlock> {
    nets.iter()
        .map(|n| pb::IpBlock {
            address: ip_to_bytes(n.addr()),
            prefix_len: u32::from(n.prefix_len()),
        })
        .collect()
}

impl From<WorkloadDoc> for pb::Workload {
    fn from(w: WorkloadDoc) -> Self {
        pb::Workload {
            uid: w
                .uid
                .unwrap_or_else(|| format!("{}/{}", w.namespace, w.name)),
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account.unwrap_or_default(),
            trust_domain: w.trust_domain.unwrap_or_default(),
            node: w.node,
            addresses: w.addresses.into_iter().map(ip_to_bytes).collect(),
            tunnel_protocol: match w.protocol {
                ProtocolDoc::Hbone => pb::TunnelProtocol::Hbone,
                ProtocolDoc::Tcp => pb::TunnelProtocol::None,
            } as i32,
            waypoint: w.waypoint.map(gateway),
            authorization_policies: w.authorization_policies,
            labels: w.labels.into_iter().collect(),
            workload_name: w.workload_name,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            zone: w.zone,
            is_waypoint: w.is_waypoint,
            outbound_policy: match w.outbound_policy {
                OutboundDoc::AllowAny => pb::OutboundPolicy::AllowAny,
                OutboundDoc::RegistryOnly => pb::OutboundPolicy::RegistryOnly,
            } as i32,
        }
    }
}

impl From<ServiceDoc> for pb::Service {
    fn from(s: ServiceDoc) -> Self {
        pb::Service {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips: s.vips.into_iter().map(ip_to_bytes).collect(),
            ports: s
                .ports
                .into_iter()
                .map(|p| pb::ServicePort {
                    service_port: u32::from(p.port),
                    target_port: u32::from(p.target_port),
                    name: p.name,
                    app_protocol: p.app_protocol,
                })
                .collect(),
            endpoints: s
                .endpoints
                .into_iter()
                .map(|e| pb::Endpoint {
                    workload_uid: e.workload_uid,
                    ports: e
                        .ports
                        .into_iter()
                        .map(|(k, v)| (u32::from(k), u32::from(v)))
                        .collect(),
                    ready: e.ready,
                })
                .collect(),
            waypoint: s.waypoint.map(gateway),
            load_balancing: match s.load_balancing {
                LbDoc::Random => pb::LoadBalancing::Random,
                LbDoc::LeastConnections => pb::LoadBalancing::LeastConnections,
                LbDoc::RoundRobin => pb::LoadBalancing::RoundRobin,
            } as i32,
        }
    }
}

impl From<PolicyDoc> for pb::Authorization {
    fn from(p: PolicyDoc) -> Self {
        let rules = p
            .rules
            .into_iter()
            .map(|r| pb::Rule {
                from: r
                    .from
                    .into_iter()
                    .map(|s| pb::Source {
                        principals: string_matches(&s.principals),
                        not_principals: string_matches(&s.not_principals),
                        namespaces: string_matches(&s.namespaces),
                        not_namespaces: string_matches(&s.not_namespaces),
                        ip_blocks: blocks(&s.ip_blocks),
                        not_ip_blocks: blocks(&s.not_ip_blocks),
                        request_principals: string_matches(&s.request_principals),
                        not_request_principals: string_matches(&s.not_request_principals),
                        remote_ip_blocks: blocks(&s.remote_ip_blocks),
                        not_remote_ip_blocks: blocks(&s.not_remote_ip_blocks),
                    })
                    .collect(),
                to: r
                    .to
                    .into_iter()
                    .map(|o| pb::Operation {
                        ports: o.ports.into_iter().map(u32::from).collect(),
                        not_ports: o.not_ports.into_iter().map(u32::from).collect(),
                        hosts: string_matches(&o.hosts),
                        not_hosts: string_matches(&o.not_hosts),
                        methods: o.methods,
                        not_methods: o.not_methods,
                        paths: string_matches(&o.paths),
                        not_paths: string_matches(&o.not_paths),
                    })
                    .collect(),
                when: r
                    .when
                    .into_iter()
                    .map(|c| pb::Condition {
                        key: c.key,
                        values: c.values,
                        not_values: c.not_values,
                    })
                    .collect(),
            })
            .collect();
        pb::Authorization {
            name: p.name,
            namespace: p.namespace,
            scope: match p.scope {
                ScopeDoc::WorkloadSelector => pb::PolicyScope::WorkloadSelector,
                ScopeDoc::Namespace => pb::PolicyScope::Namespace,
                ScopeDoc::Global => pb::PolicyScope::Global,
            } as i32,
            action: match p.action {
                ActionDoc::Allow => pb::PolicyAction::Allow,
                ActionDoc::Deny => pb::PolicyAction::Deny,
                ActionDoc::Audit => pb::PolicyAction::Audit,
            } as i32,
            rules,
            target_gateway: p.target_gateway,
            target_service: p.target_service,
        }
    }
}

impl From<PeerAuthDoc> for pb::PeerAuthentication {
    fn from(p: PeerAuthDoc) -> Self {
        let scope = match p.scope {
            Some(s) => s,
            None if !p.selector.is_empty() => ScopeDoc::WorkloadSelector,
            None => ScopeDoc::Namespace,
        };
        let doc = PeerAuthentication {
            name: p.name.as_str().into(),
            namespace: p.namespace.as_str().into(),
            scope: match scope {
                ScopeDoc::WorkloadSelector => super::PolicyScope::WorkloadSelector,
                ScopeDoc::Namespace => super::PolicyScope::Namespace,
                ScopeDoc::Global => super::PolicyScope::Global,
            },
            selector: p
                .selector
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            mode: p.mode,
            port_level_mtls: p.port_level_mtls,
        };
        // The engine's encoder: one spelling of the wire form.
        pb::PeerAuthentication::from(&doc)
    }
}

// ---- entry points ----------------------------------------------------------------------

/// Parses `text` (YAML, or JSON which is YAML) into a full-state push at `version`.
/// `origin` names the source in errors (a path, "inline"...).
pub fn parse(origin: &str, text: &str, version: u64) -> Result<pb::Push, StaticFileError> {
    let doc: Document = if text.trim().is_empty() {
        Document::default()
    } else {
        serde_yaml::from_str(text).map_err(|source| StaticFileError::Syntax {
            origin: origin.to_string(),
            source,
        })?
    };
    let invalid = |item: String| {
        let origin = origin.to_string();
        move |source| StaticFileError::Invalid {
            origin,
            item,
            source: Box::new(source),
        }
    };
    // Two items with one key would make the store refuse the whole push without saying
    // which items; say it here (found by the fuzz target `static_state`).
    let duplicate = |item: String, kind: &'static str, key: String| StaticFileError::Invalid {
        origin: origin.to_string(),
        item,
        source: Box::new(ConvertError::Duplicate { kind, key }),
    };
    let mut upserts = Vec::new();
    let mut uids = HashSet::new();
    for (i, w) in doc.workloads.into_iter().enumerate() {
        let w = pb::Workload::from(w);
        // Converted here too so that errors say which item of the file is wrong.
        Workload::try_from(w.clone()).map_err(invalid(format!("workloads[{i}]")))?;
        if uids.contains(&w.uid) {
            return Err(duplicate(format!("workloads[{i}]"), "workload", w.uid));
        }
        uids.insert(w.uid.clone());
        upserts.push(pb::Resource {
            kind: Some(pb::resource::Kind::Workload(w)),
        });
    }
    let mut service_keys = HashSet::new();
    for (i, s) in doc.services.into_iter().enumerate() {
        let s = pb::Service::from(s);
        let key = Service::try_from(s.clone())
            .map_err(invalid(format!("services[{i}]")))?
            .key();
        if !service_keys.insert(key.clone()) {
            return Err(duplicate(format!("services[{i}]"), "service", key));
        }
        // A typo in an endpoint would silently leave the service without it.
        if let Some((j, e)) = s
            .endpoints
            .iter()
            .enumerate()
            .find(|(_, e)| !uids.contains(&e.workload_uid))
        {
            return Err(StaticFileError::UnknownWorkload {
                origin: origin.to_string(),
                item: format!("services[{i}].endpoints[{j}]"),
                uid: e.workload_uid.clone(),
            });
        }
        upserts.push(pb::Resource {
            kind: Some(pb::resource::Kind::Service(s)),
        });
    }
    let mut policy_keys = HashSet::new();
    for (i, p) in doc.policies.into_iter().enumerate() {
        let p = pb::Authorization::from(p);
        let key = Authorization::try_from(p.clone())
            .map_err(ConvertError::from)
            .map_err(invalid(format!("policies[{i}]")))?
            .key();
        if !policy_keys.insert(key.clone()) {
            return Err(duplicate(format!("policies[{i}]"), "authorization", key));
        }
        upserts.push(pb::Resource {
            kind: Some(pb::resource::Kind::Authorization(p)),
        });
    }
    let mut peer_auth_keys = HashSet::new();
    for (i, p) in doc.peer_authentications.into_iter().enumerate() {
        let p = pb::PeerAuthentication::from(p);
        let key = PeerAuthentication::try_from(p.clone())
            .map_err(ConvertError::from)
            .map_err(invalid(format!("peerAuthentications[{i}]")))?
            .key();
        if !peer_auth_keys.insert(key.clone()) {
            return Err(duplicate(
                format!("peerAuthentications[{i}]"),
                "peer authentication",
                key,
            ));
        }
        upserts.push(pb::Resource {
            kind: Some(pb::resource::Kind::PeerAuthentication(p)),
        });
    }
    let mut external_keys = HashSet::new();
    for (i, x) in doc.external_services.into_iter().enumerate() {
        let x = pb::ExternalService::from(x);
        let key = ExternalService::try_from(x.clone())
            .map_err(invalid(format!("externalServices[{i}]")))?
            .key();
        if !external_keys.insert(key.clone()) {
            return Err(duplicate(
                format!("externalServices[{i}]"),
                "external service",
                key,
            ));
        }
        upserts.push(pb::Resource {
            kind: Some(pb::resource::Kind::ExternalService(x)),
        });
    }
    Ok(pb::Push {
        nonce: format!("static-{version}"),
        full_state: true,
        version,
        upserts,
        removals: Vec::new(),
        trust_roots: doc.trust_roots,
    })
}

/// Reads and parses the file at `path` (see [`parse`]).
pub fn load(path: &Path, version: u64) -> Result<pb::Push, StaticFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| StaticFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&path.display().to_string(), &text, version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;

    #[test]
    fn example_file_loads_into_a_store() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/static-state.yaml");
        let push = load(&path, 1).unwrap();
        let mut store = Store::new(Some("node-1"));
        let out = store.apply(push).unwrap();
        assert!(
            out.workloads >= 3 && out.services >= 1 && out.policies >= 1,
            "{out:?}"
        );
        assert_eq!(out.peer_authentications, 2, "{out:?}");
        let state = store.snapshot();
        let web = state.workload_by_ip("10.0.1.5".parse().unwrap()).unwrap();
        assert_eq!(
            web.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        let svc = state
            .service_by_hostname("web.default.svc.cluster.local")
            .unwrap();
        assert_eq!(svc.ports[0].target_port, 8080);
    }

    #[test]
    fn errors_name_field_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "workloads:\n  - name: a\n    namespace: default\n    addresses: [10.0.0.1, 10.0.0]\n",
                "workloads[0].addresses[1]: invalid IP address syntax at line 4",
            ),
            (
                "workloads:\n  - name: a\n    namespace: Default\n    addresses: []\n",
                "workloads[0].namespace: \"Default\" is not a Kubernetes name",
            ),
            (
                "workloads:\n  - name: a\n    namespace: default\n    adresses: []\n",
                "unknown field `adresses`",
            ),
            (
                "services:\n  - name: s\n    namespace: default\n    ports: [{port: 70000}]\n",
                "services[0].ports[0].port",
            ),
            (
                "policies:\n  - name: p\n    namespace: default\n    action: REJECT\n",
                "policies[0].action: unknown variant `REJECT`",
            ),
            (
                "policies:\n  - name: p\n    namespace: default\n    rules:\n      - from:\n          - ipBlocks: [10.0.0.0/40]\n",
                "policies[0].rules[0].from[0].ipBlocks[0]: \"10.0.0.0/40\" is not an IP address or CIDR at line 6",
            ),
            (
                "peerAuthentications:\n  - name: p\n    namespace: default\n    mode: STRIKT\n",
                "peerAuthentications[0].mode: unknown variant `STRIKT`",
            ),
            (
                "peerAuthentications:\n  - name: p\n    namespace: default\n    selector: {app: a}\n    portLevelMtls: {70000: STRICT}\n",
                "peerAuthentications[0].portLevelMtls",
            ),
            (
                "peerAuthentications:\n  - name: p\n    namespace: default\n    portLevelMtls: {8080: STRICT}\n",
                "peerAuthentications[0]: peer authentication default/p: port_level_mtls[8080] \"8080\" is invalid: port-level modes need a workload selector",
            ),
            (
                "services:\n  - name: s\n    namespace: default\n    endpoints: [{workloadUid: default/nope}]\n",
                "services[0].endpoints[0].workloadUid \"default/nope\": no workload",
            ),
            (
                "services:\n  - name: s\n    namespace: default\n    ports: [{port: 80}, {port: 80}]\n",
                "services[0]: service default/s: ports[1].service_port \"80\" is invalid: listed twice",
            ),
        ];
        for (text, want) in cases {
            let err = parse("t.yaml", text, 1).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            assert!(err.starts_with("t.yaml: "), "{err:?}");
        }
    }

    #[test]
    fn json_and_empty_files_work() {
        let push = parse(
            "j",
            r#"{"workloads":[{"name":"a","namespace":"b","addresses":["fd00::1"]}]}"#,
            3,
        )
        .unwrap();
        assert_eq!(push.upserts.len(), 1);
        assert!(push.full_state);
        assert!(parse("e", "", 1).unwrap().upserts.is_empty());
    }

    #[test]
    fn items_listed_twice_are_named() {
        // Found by the fuzz target `static_state`: the file parsed, and the store then
        // refused its push without naming the items.
        for (text, want) in [
            (
                "workloads:\n- {name: a, namespace: d, addresses: [10.0.0.1]}\n- {name: a, namespace: d, addresses: [10.0.0.2]}\n",
                "inline: workloads[1]: workload \"d/a\" appears twice",
            ),
            (
                "services:\n- {name: s, namespace: d}\n- {name: s, namespace: d}\n",
                "inline: services[1]: service",
            ),
            (
                "policies:\n- {name: p, namespace: d}\n- {name: p, namespace: d, action: DENY}\n",
                "inline: policies[1]: authorization \"d/p\" appears twice",
            ),
        ] {
            let err = parse("inline", text, 1).expect_err("duplicate accepted");
            assert!(err.to_string().contains(want), "{err}");
        }
    }
}
