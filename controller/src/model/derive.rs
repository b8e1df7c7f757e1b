//! Derivation of the wire resources from the stored objects: workloads from pods,
//! services with their endpoints, (via [`super::policy`]) authorizations, routes and
//! traffic policies, (via [`super::peer_auth`]) peer authentications, and (via
//! [`super::external`]) external services and the workloads' outbound policy.
//!
//! A pure function of the store and the config, so it is tested with fixtures and no
//! runtime. Problems are collected, not returned early: one bad object must never stop
//! the rest of the mesh from updating.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ambit_proto::discovery::{
    resource, Endpoint, GatewayAddress, LoadBalancing, OutboundPolicy, Resource,
    Service as WireService, ServicePort, TunnelProtocol, Workload,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::policy::{self, Authorizations};
use super::{
    ip_bytes, selects, typed, typed_in, FieldError, Key, Kind, MeshPod, ModelConfig, ModelError,
    Store,
};
use crate::crd::gateway::WAYPOINT_CLASS;

/// Namespace label that enrolls its pods (`ambient`); on a pod, `none` opts it out.
pub const DATAPLANE_MODE_LABEL: &str = "ambit.dev/dataplane-mode";
/// Label on a namespace, service or pod naming the waypoint its inbound traffic uses.
pub const USE_WAYPOINT_LABEL: &str = "ambit.dev/use-waypoint";
/// Optional label naming the waypoint's namespace when it is not the object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "ambit.dev/use-waypoint-namespace";
/// Label Gateway API implementations put on a gateway's pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Node label naming the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Port on which waypoints accept HBONE unless their Gateway lists another.
pub const HBONE_PORT: u32 = ambit_proto::ports::HBONE as u32;

/// One derived resource and what the discovery service needs to route it.
#[derive(Clone, Debug)]
pub struct DerivedResource {
    pub resource: Resource,
    /// `namespace/name` of the waypoint Gateway the workload or service uses.
    pub waypoint: Option<String>,
}

/// Everything derived from one store.
#[derive(Debug, Default)]
pub struct Derived {
    pub resources: BTreeMap<Key, DerivedResource>,
    pub errors: Vec<ModelError>,
}

impl Derived {
    fn push(&mut self, resource: resource::Kind, waypoint: Option<String>) {
        let resource = Resource {
            kind: Some(resource),
        };
        if let Some(key) = Key::of(&resource) {
            self.resources
                .insert(key, DerivedResource { resource, waypoint });
        }
    }
}

/// Derives every resource proxies may need from the store.
pub fn derive(store: &Store, config: &ModelConfig) -> Derived {
    let mut out = Derived::default();
    let context = Context::new(store, config, &mut out.errors);
    for pod in typed!(store, Pod) {
        if let Some((w, waypoint)) = workload(pod, config, &context, &mut out.errors) {
            out.push(resource::Kind::Workload(w), waypoint);
        }
    }
    for svc in typed!(store, Service) {
        if let Some((s, waypoint)) = service(svc, store, config, &context, &mut out.errors) {
            out.push(resource::Kind::Service(s), waypoint);
        }
    }
    policies(store, config, &context, &mut out);
    out
}

/// Everything but workloads and services: authorizations, routes, traffic policies, peer
/// and request authentications, external services. Few objects, each derived on its own,
/// so they are derived whole on every change (see [`super::incremental`]).
pub(super) fn policies(store: &Store, config: &ModelConfig, context: &Context, out: &mut Derived) {
    for a in &context.authz.policies {
        let wire = ambit_proto::discovery::Authorization::from(&a.policy);
        out.push(resource::Kind::Authorization(wire), None);
    }
    for r in policy::routes(store, config, &mut out.errors) {
        out.push(resource::Kind::Route(r), None);
    }
    for t in policy::traffic_policies(store, config, &mut out.errors) {
        out.push(resource::Kind::TrafficPolicy(t), None);
    }
    for p in super::peer_auth::peer_authentications(store, config, &mut out.errors) {
        let wire = ambit_proto::discovery::PeerAuthentication::from(&p);
        out.push(resource::Kind::PeerAuthentication(wire), None);
    }
    for a in super::authn::request_authentications(store, config, &mut out.errors) {
        out.push(resource::Kind::RequestAuthentication(a), None);
    }
    let waypoints = &context.waypoints;
    for (mut x, labels) in super::external::external_services(store, &mut out.errors) {
        let ns_labels = context.ns_labels(&x.namespace);
        let asked = [labels, ns_labels]
            .into_iter()
            .flatten()
            .find_map(|l| l.get(USE_WAYPOINT_LABEL))
            .is_some_and(|gw| !gw.is_empty() && gw != "none");
        let waypoint = waypoints.resolve(
            Kind::ExternalService,
            &x.namespace,
            &x.name,
            labels,
            ns_labels,
            &mut out.errors,
        );
        // Its L7 policy lives in the waypoint it asked for: until that waypoint resolves
        // (the error above says why), the service is withheld, so a REGISTRY_ONLY pod is
        // refused rather than sent straight out past that policy.
        if asked && waypoint.is_none() {
            continue;
        }
        x.waypoint = waypoint.as_ref().map(|(_, a)| a.clone());
        out.push(resource::Kind::ExternalService(x), waypoint.map(|(k, _)| k));
    }
}

/// What the derivation of a workload or a service reads besides its own object (and, for
/// a service, the pods and endpoint slices of its namespace): small, so it is computed
/// whole on every change, and comparing it with the previous one tells which workloads
/// and services a change of a namespace, gateway, node or policy touches.
pub(super) struct Context {
    pub waypoints: Waypoints,
    pub authz: Authorizations,
    /// Each namespace's labels (`None`: it has none).
    pub namespaces: HashMap<String, Option<Labels>>,
    /// Each namespace's outbound policy, its label checked once rather than once per pod.
    pub outbound: HashMap<String, OutboundPolicy>,
    /// Each node's zone.
    pub zones: HashMap<String, String>,
    /// Each service's load-balancing algorithm, by (namespace, name).
    pub lb: HashMap<(String, String), LoadBalancing>,
}

impl Context {
    /// Computes the context from the store; problems with policies and namespace labels
    /// go to `errors`.
    pub fn new(store: &Store, config: &ModelConfig, errors: &mut Vec<ModelError>) -> Context {
        let waypoints = Waypoints::collect(store, config);
        let authz = policy::authorizations(store, config, errors);
        let namespaces: HashMap<String, Option<Labels>> = typed!(store, Namespace)
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone())))
            .collect();
        // Zones come from the nodes, as Kubernetes' topology labels put them there.
        let zones = typed!(store, Node)
            .filter_map(|n| {
                let zone = n.metadata.labels.as_ref()?.get(ZONE_LABEL)?;
                Some((n.metadata.name.clone()?, zone.clone()))
            })
            .collect();
        let mut outbound = HashMap::new();
        for (name, labels) in &namespaces {
            let policy = super::external::outbound_policy(labels.as_ref()).unwrap_or_else(|e| {
                errors.push(ModelError::OutboundPolicyInvalid {
                    namespace: name.to_string(),
                    field: e.field,
                    why: e.why,
                });
                // Whoever set the label meant to restrict: fail closed.
                OutboundPolicy::RegistryOnly
            });
            outbound.insert(name.clone(), policy);
        }
        Context {
            waypoints,
            authz,
            namespaces,
            outbound,
            zones,
            lb: policy::load_balancing(store),
        }
    }

    /// A namespace's labels, if it exists and has some.
    pub fn ns_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace)?.as_ref()
    }
}

/// The waypoints (Gateways of class `ambit-waypoint`), by `namespace/name`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Waypoints(HashMap<String, Result<GatewayAddress, &'static str>>);

impl Waypoints {
    fn collect(store: &Store, config: &ModelConfig) -> Self {
        let mut map = HashMap::new();
        for gw in typed!(store, Gateway) {
            if gw.spec.gateway_class_name != WAYPOINT_CLASS {
                continue;
            }
            let (Some(ns), Some(name)) = (
                gw.metadata.namespace.as_deref(),
                gw.metadata.name.as_deref(),
            ) else {
                continue;
            };
            // The status (what the platform assigned) wins over what the spec asked for.
            let status = gw.status.iter().flat_map(|s| s.addresses.iter());
            let address = status
                .chain(gw.spec.addresses.iter())
                .filter(|a| matches!(a.type_.as_deref(), None | Some("IPAddress")))
                .find_map(|a| a.value.parse::<IpAddr>().ok());
            let port = gw
                .spec
                .listeners
                .iter()
                .find(|l| l.protocol.eq_ignore_ascii_case("HBONE"))
                .map_or(HBONE_PORT, |l| u32::from(l.port));
            let entry = match address {
                Some(ip) => Ok(GatewayAddress {
                    address: ip_bytes(ip),
                    hbone_port: port,
                    identity: format!("spiffe://{}/ns/{ns}/sa/{name}", config.trust_domain),
                }),
                None => Err("has no IP address in status.addresses or spec.addresses"),
            };
            map.insert(format!("{ns}/{name}"), entry);
        }
        Waypoints(map)
    }

    /// The waypoint an object uses: its own label, else its namespace's; `none` opts out.
    /// Returns the Gateway key and address, or records why it cannot be resolved.
    fn resolve(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
        ns_labels: Option<&BTreeMap<String, String>>,
        errors: &mut Vec<ModelError>,
    ) -> Option<(String, GatewayAddress)> {
        let from = [labels, ns_labels]
            .into_iter()
            .flatten()
            .find(|l| l.contains_key(USE_WAYPOINT_LABEL))?;
        let gw_name = from.get(USE_WAYPOINT_LABEL)?;
        if gw_name == "none" || gw_name.is_empty() {
            return None;
        }
        let gw_ns = from
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .map_or(namespace, String::as_str);
        let key = format!("{gw_ns}/{gw_name}");
        let unresolved = |why| ModelError::WaypointUnresolved {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            waypoint: key.clone(),
            why,
        };
        match self.0.get(&key) {
            Some(Ok(addr)) => Some((key, addr.clone())),
            Some(Err(why)) => {
                errors.push(unresolved(why));
                None
            }
            None => {
                errors.push(unresolved("is not a Gateway of class ambit-waypoint"));
                None
            }
        }
    }
}

pub(super) type Labels = BTreeMap<String, String>;

/// The workload of one pod, if it has one.
pub(super) fn workload(
    pod: &MeshPod,
    config: &ModelConfig,
    context: &Context,
    errors: &mut Vec<ModelError>,
) -> Option<(Workload, Option<String>)> {
    let waypoints = &context.waypoints;
    let meta = &pod.metadata;
    let name = meta.name.clone()?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| super::DEFAULT_NAMESPACE.into());
    if matches!(pod_phase(pod), Some("Succeeded" | "Failed")) {
        return None;
    }
    let empty = Labels::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    let nsl = context.ns_labels(&namespace);
    let enrolled = nsl
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str)
        == Some("ambient")
        && labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) != Some("none");
    let addresses = pod_ips(pod, &namespace, &name, errors);
    let gateway_of_pod = labels
        .get(GATEWAY_NAME_LABEL)
        .map(|gw| format!("{namespace}/{gw}"))
        .filter(|k| waypoints.0.contains_key(k));
    let is_waypoint = gateway_of_pod.is_some();
    // A waypoint never sends its own inbound traffic through a waypoint, and traffic to
    // pods outside the mesh is not captured, so neither gets one.
    let waypoint = if enrolled && !is_waypoint {
        waypoints.resolve(Kind::Pod, &namespace, &name, Some(labels), nsl, errors)
    } else {
        None
    };
    let workload_name = owner_workload_name(pod).unwrap_or_else(|| name.clone());
    let canonical_name = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|l| labels.get(*l))
    .cloned()
    .unwrap_or_else(|| workload_name.clone());
    let canonical_revision = [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|l| labels.get(*l))
    .cloned()
    .unwrap_or_else(|| "latest".to_string());
    let w = Workload {
        uid: meta
            .uid
            .clone()
            .unwrap_or_else(|| format!("{namespace}/{name}")),
        service_account: pod
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        trust_domain: config.trust_domain.clone(),
        node: pod.node_name.clone().unwrap_or_default(),
        addresses: addresses.into_iter().map(ip_bytes).collect(),
        // A waypoint speaks HBONE itself (it binds 15008 in its own pod): capturing it
        // would put ztunnel's listeners in its way and tunnel its tunnels again.
        tunnel_protocol: if enrolled && !is_waypoint {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        } as i32,
        waypoint: waypoint.as_ref().map(|(_, a)| a.clone()),
        authorization_policies: context.authz.selecting(&namespace, labels),
        labels: labels.clone().into_iter().collect(),
        workload_name,
        canonical_name,
        canonical_revision,
        zone: pod
            .node_name
            .as_deref()
            .and_then(|n| context.zones.get(n))
            .cloned()
            .unwrap_or_default(),
        is_waypoint,
        outbound_policy: context
            .outbound
            .get(namespace.as_str())
            .copied()
            .unwrap_or_default() as i32,
        name,
        namespace,
    };
    Some((w, waypoint.map(|(k, _)| k)))
}

fn pod_phase(pod: &MeshPod) -> Option<&str> {
    pod.phase.as_deref()
}

/// The pod's IPs: `status.podIPs`, else `status.podIP`. Unparseable ones are reported.
fn pod_ips(
    pod: &MeshPod,
    namespace: &str,
    name: &str,
    errors: &mut Vec<ModelError>,
) -> Vec<IpAddr> {
    let mut raw: Vec<(String, &str)> = Vec::new();
    for (i, ip) in pod.pod_ips.iter().enumerate() {
        raw.push((format!("status.podIPs[{i}].ip"), ip.as_str()));
    }
    if raw.is_empty() {
        if let Some(ip) = pod.pod_ip.as_deref() {
            raw.push(("status.podIP".to_string(), ip));
        }
    }
    let mut out = Vec::new();
    for (field, value) in raw {
        match value.parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(source) => errors.push(ModelError::Rejected {
                kind: Kind::Pod,
                namespace: namespace.to_string(),
                name: name.to_string(),
                field,
                reason: FieldError::Ip {
                    value: value.to_string(),
                    source,
                },
            }),
        }
    }
    out
}

/// Ready per the `Ready` condition; a pod without conditions (local mode has no kubelet)
/// is ready once it has an address.
fn pod_ready(pod: &MeshPod) -> bool {
    pod.ready_condition
        .unwrap_or_else(|| pod.pod_ip.is_some() || !pod.pod_ips.is_empty())
}

/// The owning workload's name, as metrics know it: a Deployment's pods belong to a
/// ReplicaSet `<deployment>-<hash>`, whose hash we strip.
fn owner_workload_name(pod: &MeshPod) -> Option<String> {
    let owner = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet" {
        if let Some((deployment, _hash)) = owner.name.rsplit_once('-') {
            return Some(deployment.to_string());
        }
    }
    Some(owner.name.clone())
}

/// One service with its endpoints (from its namespace's endpoint slices, else its
/// selector over the namespace's pods).
pub(super) fn service(
    svc: &Service,
    store: &Store,
    config: &ModelConfig,
    context: &Context,
    errors: &mut Vec<ModelError>,
) -> Option<(WireService, Option<String>)> {
    let (waypoints, lb) = (&context.waypoints, &context.lb);
    let meta = &svc.metadata;
    let name = meta.name.clone()?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| super::DEFAULT_NAMESPACE.into());
    let spec = svc.spec.clone().unwrap_or_default();
    let reject = |field: String, reason: FieldError| ModelError::Rejected {
        kind: Kind::Service,
        namespace: namespace.clone(),
        name: name.clone(),
        field,
        reason,
    };

    let mut vips = Vec::new();
    let ips: Vec<(String, String)> = match spec.cluster_ips.as_ref().filter(|v| !v.is_empty()) {
        Some(ips) => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
            .collect(),
        None => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip.clone()))
            .collect(),
    };
    for (field, ip) in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) => vips.push(ip_bytes(ip)),
            Err(source) => {
                // A service whose VIP we cannot read would be routed wrongly: reject it.
                errors.push(reject(field, FieldError::Ip { value: ip, source }));
                return None;
            }
        }
    }

    let svc_ports = spec.ports.clone().unwrap_or_default();
    let ports: Vec<ServicePort> = svc_ports
        .iter()
        .map(|p| ServicePort {
            service_port: u32::try_from(p.port).unwrap_or(0),
            target_port: match &p.target_port {
                None => u32::try_from(p.port).unwrap_or(0),
                Some(IntOrString::Int(n)) => u32::try_from(*n).unwrap_or(0),
                // Resolved per endpoint: each pod may number its named port differently.
                Some(IntOrString::String(_)) => 0,
            },
            name: p.name.clone().unwrap_or_default(),
            app_protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
        })
        .collect();

    let slices: Vec<_> = typed_in!(store, EndpointSlice, &namespace)
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                == Some(&name)
        })
        .collect();
    let pods_in_ns: Vec<&MeshPod> = typed_in!(store, Pod, &namespace)
        .filter(|p| !matches!(pod_phase(p), Some("Succeeded" | "Failed")))
        .collect();
    let uid_of = |p: &MeshPod| {
        p.metadata.uid.clone().unwrap_or_else(|| {
            format!(
                "{namespace}/{}",
                p.metadata.name.as_deref().unwrap_or_default()
            )
        })
    };

    let mut endpoints: BTreeMap<String, Endpoint> = BTreeMap::new();
    if !slices.is_empty() {
        // Given slices are the truth (Kubernetes computed them); we only map their
        // addresses back to workloads.
        let by_ip: HashMap<IpAddr, &MeshPod> = pods_in_ns
            .iter()
            .flat_map(|p| {
                pod_ips(p, "", "", &mut Vec::new())
                    .into_iter()
                    .map(move |ip| (ip, *p))
            })
            .collect();
        for slice in slices {
            for ep in slice.endpoints.iter().flatten() {
                let pod = ep
                    .addresses
                    .iter()
                    .find_map(|a| a.parse::<IpAddr>().ok().and_then(|ip| by_ip.get(&ip)));
                let Some(pod) = pod else { continue };
                let mut port_map = HashMap::new();
                for sp in &svc_ports {
                    let slice_port = slice.ports.iter().flatten().find(|p| p.name == sp.name);
                    if let Some(port) = slice_port.and_then(|p| p.port) {
                        if Some(&IntOrString::Int(port)) != sp.target_port.as_ref() {
                            port_map.insert(sp.port as u32, port as u32);
                        }
                    }
                }
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let uid = uid_of(pod);
                endpoints.insert(
                    uid.clone(),
                    Endpoint {
                        workload_uid: uid,
                        ports: port_map,
                        ready,
                    },
                );
            }
        }
    } else if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
        for pod in pods_in_ns {
            let empty = Labels::new();
            if !selects(selector, pod.metadata.labels.as_ref().unwrap_or(&empty)) {
                continue;
            }
            if pod_ips(pod, "", "", &mut Vec::new()).is_empty() {
                continue;
            }
            let mut port_map = HashMap::new();
            for sp in &svc_ports {
                if let Some(IntOrString::String(port_name)) = &sp.target_port {
                    if let Some(n) = container_port(pod, port_name) {
                        port_map.insert(sp.port as u32, n);
                    }
                }
            }
            let uid = uid_of(pod);
            endpoints.insert(
                uid.clone(),
                Endpoint {
                    workload_uid: uid,
                    ports: port_map,
                    ready: pod_ready(pod),
                },
            );
        }
    }

    let empty = Labels::new();
    let waypoint = waypoints.resolve(
        Kind::Service,
        &namespace,
        &name,
        Some(meta.labels.as_ref().unwrap_or(&empty)),
        context.ns_labels(&namespace),
        errors,
    );
    let s = WireService {
        hostname: config.service_hostname(&name, &namespace),
        vips,
        ports,
        endpoints: endpoints.into_values().collect(),
        waypoint: waypoint.as_ref().map(|(_, a)| a.clone()),
        load_balancing: lb
            .get(&(namespace.clone(), name.clone()))
            .copied()
            .unwrap_or(LoadBalancing::Unspecified) as i32,
        name,
        namespace,
    };
    Some((s, waypoint.map(|(k, _)| k)))
}

fn container_port(pod: &MeshPod, port_name: &str) -> Option<u32> {
    pod.named_port(port_name)
        .and_then(|p| u32::try_from(p).ok())
}

/// `appProtocol` if given, else Istio's port-name convention (`http-web`, `grpc`, ...).
fn app_protocol(app_protocol: Option<&str>, name: Option<&str>) -> String {
    let from_name = |n: &str| {
        let prefix = n.split('-').next().unwrap_or_default().to_ascii_lowercase();
        match prefix.as_str() {
            "http" => "HTTP",
            "http2" | "h2c" => "HTTP2",
            "grpc" => "GRPC",
            _ => "TCP",
        }
    };
    match app_protocol {
        Some(p) => match p.to_ascii_lowercase().as_str() {
            "http" => "HTTP".into(),
            "http2" | "kubernetes.io/h2c" => "HTTP2".into(),
            "grpc" => "GRPC".into(),
            "tcp" => "TCP".into(),
            other => other.to_ascii_uppercase(),
        },
        None => name.map_or("TCP", from_name).into(),
    }
}
