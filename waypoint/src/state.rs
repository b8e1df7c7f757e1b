//! What the waypoint knows about the mesh: workloads, services, the authorization policies,
//! routes and traffic policies bound to it. One serde shape ([`StateFile`]) serves the static
//! file mode (YAML or JSON), the discovery client's output and the admin config dump; it is
//! compiled into an indexed [`State`] (routes and traffic policies checked, each service's
//! ready endpoints listed per service port) that request handling reads through
//! [`StateHandle`] (one writer, lock-free readers): what can be worked out once per state
//! change is not worked out again per request.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use ambit_hbone::Identity;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::authn::{
    AuthnConfigError, JwtRule, Keys, RequestAuthentication, RequestAuthenticationResource,
};
use crate::external::{is_h2, Compiled, ExternalError, ExternalService, Resolution};
use crate::policy::{self, Policy, PolicyError};
use crate::resilience::{ResilienceError, Settings, TrafficPolicyResource};
use crate::route::{RouteError, RouteResource, Rule};

/// Why a state could not be loaded or built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The static file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The static file is neither valid YAML nor JSON of the expected shape.
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    /// A workload's identity is not a valid SPIFFE identity.
    #[error("workload {uid}: invalid identity: {source}")]
    Identity {
        uid: String,
        #[source]
        source: ambit_hbone::identity::IdentityError,
    },
    /// A route does not compile.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A traffic policy does not compile.
    #[error(transparent)]
    Resilience(#[from] ResilienceError),
    /// A policy cannot be evaluated.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A RequestAuthentication does not compile.
    #[error(transparent)]
    Authn(#[from] AuthnConfigError),
    /// An external service does not compile.
    #[error(transparent)]
    External(#[from] ExternalError),
}

/// A pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub addresses: Vec<IpAddr>,
    /// Owner name for metrics (`reviews-v1`); the pod name when empty.
    pub workload_name: String,
}

impl Workload {
    /// The SPIFFE identity it proves.
    pub fn identity(&self) -> Result<Identity, StateError> {
        let td = if self.trust_domain.is_empty() {
            ambit_hbone::identity::DEFAULT_TRUST_DOMAIN
        } else {
            &self.trust_domain
        };
        Identity::new(td, &self.namespace, &self.service_account).map_err(|source| {
            StateError::Identity {
                uid: self.uid.clone(),
                source,
            }
        })
    }

    /// The name used in metrics.
    pub fn metrics_name(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }
}

/// A service port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServicePort {
    pub service_port: u16,
    /// 0 means the same as `service_port`.
    pub target_port: u16,
    pub app_protocol: String,
}

/// An endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
    /// Target port by service port, when it differs per endpoint.
    pub ports: BTreeMap<u16, u16>,
    pub ready: bool,
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint {
            workload_uid: String::new(),
            ports: BTreeMap::new(),
            ready: true,
        }
    }
}

/// A service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`.
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// `namespace/hostname`, the key routes and policies use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// Everything the waypoint is told, in one serialisable shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StateFile {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    pub routes: Vec<RouteResource>,
    pub traffic_policies: Vec<TrafficPolicyResource>,
    pub request_authentications: Vec<RequestAuthenticationResource>,
    /// The ExternalServices bound to this waypoint (egress through it).
    pub external_services: Vec<ExternalService>,
}

impl StateFile {
    /// Reads a YAML (or JSON, a subset of YAML) file.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = std::fs::read_to_string(path).map_err(|source| StateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| StateError::Parse {
            path: path.display().to_string(),
            source,
        })
    }
}

/// An endpoint ready to dial.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// A pod's ip and target port (the tunnel's `:authority`), or an external instance's
    /// address (for one resolved by name when dialled, an unspecified ip and the port).
    pub addr: SocketAddr,
    pub peer: Peer,
}

/// How an endpoint is reached.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A mesh pod: HBONE to its ztunnel, which must present the pod's identity.
    Mesh {
        identity: Identity,
        workload: Arc<Workload>,
    },
    /// Outside the mesh (an external service bound to this waypoint): TCP straight to it.
    External(Arc<Direct>),
}

/// How the waypoint dials an external instance.
#[derive(Debug)]
pub struct Direct {
    /// `namespace/name` of the ExternalService.
    pub service: String,
    /// A host name to resolve when dialling (resolution DNS); the upstream's port applies.
    pub host: Option<String>,
    /// TLS origination, when the port asks for it.
    pub tls: Option<Originate>,
    /// HTTP/2 to the instance (port protocol HTTP2 or GRPC), else HTTP/1.1.
    pub h2: bool,
}

/// TLS the waypoint opens to an external instance.
#[derive(Debug)]
pub struct Originate {
    pub server_name: rustls_pki_types::ServerName<'static>,
    pub config: Arc<rustls::ClientConfig>,
}

impl Upstream {
    /// A mesh endpoint.
    pub fn mesh(addr: SocketAddr, identity: Identity, workload: Arc<Workload>) -> Self {
        Upstream {
            addr,
            peer: Peer::Mesh { identity, workload },
        }
    }

    /// How logs name it: the address, or `host:port` for one resolved when dialled.
    pub fn describe(&self) -> String {
        match &self.peer {
            Peer::External(d) if d.host.is_some() => {
                format!(
                    "{}:{}",
                    d.host.as_deref().unwrap_or_default(),
                    self.addr.port()
                )
            }
            _ => self.addr.to_string(),
        }
    }
}

/// What a tunnel's `:authority` names.
#[derive(Debug, Clone)]
pub enum Target {
    /// A service VIP and service port.
    Service { service: Arc<Service>, port: u16 },
    /// A pod address directly; `service` is one that selects it, if any (for policy).
    Workload {
        upstream: Upstream,
        service: Option<Arc<Service>>,
    },
    /// An external service bound to this waypoint, dialled at one of its VIPs (`host`: the
    /// VIP's) or addresses; `upstreams`: where it goes, in order.
    External {
        service: Arc<Compiled>,
        host: String,
        upstreams: Arc<[Upstream]>,
    },
}

/// Ready endpoints of one service per service port.
type EndpointsByPort = HashMap<u16, Arc<[Upstream]>>;

/// The compiled, indexed state.
#[derive(Debug, Default)]
pub struct State {
    /// As received, for the config dump.
    pub source: StateFile,
    workloads: HashMap<String, Arc<Workload>>,
    identities: HashMap<String, Identity>,
    workload_by_ip: HashMap<IpAddr, String>,
    services: HashMap<String, Arc<Service>>,
    service_by_vip: HashMap<IpAddr, String>,
    service_by_name: HashMap<(String, String), String>,
    /// The service a workload is an endpoint of (the first in the file that lists it).
    service_by_workload: HashMap<String, String>,
    /// Ready endpoints by service namespace, hostname and declared service port (nested so
    /// that a lookup borrows the service's own strings).
    endpoints: HashMap<String, HashMap<String, EndpointsByPort>>,
    policies: Vec<Policy>,
    /// Rules per service key, routes in `namespace/name` order; shared with the decisions
    /// that pick them.
    routes: HashMap<String, Vec<Arc<Rule>>>,
    settings: HashMap<String, Arc<Settings>>,
    /// In `namespace/name` order.
    authns: Vec<RequestAuthentication>,
    /// External services bound to this waypoint, in the file's order.
    externals: Vec<Arc<Compiled>>,
    /// The external service and host each allocated VIP stands for.
    external_by_vip: HashMap<IpAddr, (usize, String)>,
}

impl State {
    /// Checks and indexes `file`.
    pub fn build(file: StateFile) -> Result<State, StateError> {
        let mut s = State::default();
        for w in &file.workloads {
            let id = w.identity()?;
            for ip in &w.addresses {
                s.workload_by_ip.insert(*ip, w.uid.clone());
            }
            s.identities.insert(w.uid.clone(), id);
            s.workloads.insert(w.uid.clone(), Arc::new(w.clone()));
        }
        for svc in &file.services {
            let key = svc.key();
            for vip in &svc.vips {
                s.service_by_vip.insert(*vip, key.clone());
            }
            s.service_by_name
                .insert((svc.namespace.clone(), svc.name.clone()), key.clone());
            for e in &svc.endpoints {
                s.service_by_workload
                    .entry(e.workload_uid.clone())
                    .or_insert_with(|| key.clone());
            }
            s.services.insert(key, Arc::new(svc.clone()));
        }
        for svc in &file.services {
            let by_port = svc
                .ports
                .iter()
                .map(|p| (p.service_port, s.list_upstreams(svc, p.service_port)))
                .collect();
            s.endpoints
                .entry(svc.namespace.clone())
                .or_default()
                .insert(svc.hostname.clone(), by_port);
        }
        for p in &file.policies {
            policy::validate(p)?;
        }
        s.policies = file.policies.clone();
        let mut routes: Vec<&RouteResource> = file.routes.iter().collect();
        routes.sort_by_key(|r| r.key());
        for r in routes {
            let rules: Vec<Arc<Rule>> = r.compile()?.into_iter().map(Arc::new).collect();
            for parent in &r.parent_services {
                s.routes
                    .entry(parent.clone())
                    .or_default()
                    .extend(rules.iter().cloned());
            }
        }
        for tp in &file.traffic_policies {
            s.settings
                .insert(tp.target_service.clone(), Arc::new(tp.compile()?));
        }
        let mut authns = file
            .request_authentications
            .iter()
            .map(RequestAuthenticationResource::compile)
            .collect::<Result<Vec<_>, _>>()?;
        authns.sort_by(|a, b| a.key.cmp(&b.key));
        s.authns = authns;
        for x in &file.external_services {
            for v in &x.vips {
                s.external_by_vip
                    .insert(v.address, (s.externals.len(), v.host.clone()));
            }
            s.externals.push(Arc::new(Compiled::new(x.clone())?));
        }
        s.source = file;
        Ok(s)
    }

    /// The workload with this address.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip
            .get(&ip)
            .and_then(|uid| self.workloads.get(uid))
    }

    /// The workload owning `ip`, only if its identity is `proven` (the caller's certificate
    /// identity): an address (or a `Forwarded` header) naming a workload other than the one
    /// the certificate proved is no evidence of who called, so metrics and logs must not
    /// name it.
    pub fn workload_proving(&self, ip: IpAddr, proven: &Identity) -> Option<&Arc<Workload>> {
        let uid = self.workload_by_ip.get(&ip)?;
        if self.identities.get(uid)? != proven {
            return None;
        }
        self.workloads.get(uid)
    }

    /// A service by `namespace/hostname`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// A service by namespace and short name (route backends).
    pub fn service_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.service_by_name
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|k| self.services.get(k))
    }

    /// Resolves a tunnel's `:authority`.
    pub fn resolve(&self, authority: SocketAddr) -> Option<Target> {
        if let Some(svc) = self
            .service_by_vip
            .get(&authority.ip())
            .and_then(|k| self.services.get(k))
        {
            return Some(Target::Service {
                service: svc.clone(),
                port: authority.port(),
            });
        }
        if let Some((i, host)) = self.external_by_vip.get(&authority.ip()) {
            let x = self.externals.get(*i)?;
            // A port it does not declare is not the service's.
            x.service
                .ports
                .iter()
                .find(|p| p.number == authority.port())?;
            return Some(Target::External {
                upstreams: external_upstreams(x, authority, Some(host)).into(),
                host: host.clone(),
                service: x.clone(),
            });
        }
        let Some(workload) = self.workload_by_ip(authority.ip()).cloned() else {
            let x = self
                .externals
                .iter()
                .find(|x| x.service.matches(authority))?;
            return Some(Target::External {
                upstreams: external_upstreams(x, authority, None).into(),
                host: x.service.hosts.first().cloned().unwrap_or_default(),
                service: x.clone(),
            });
        };
        let identity = self.identities.get(&workload.uid)?.clone();
        let service = self
            .service_by_workload
            .get(&workload.uid)
            .and_then(|k| self.services.get(k))
            .cloned();
        Some(Target::Workload {
            upstream: Upstream::mesh(authority, identity, workload),
            service,
        })
    }

    /// Ready endpoints of `service` for service port `port`: listed when the state was built
    /// for the ports the service declares, worked out now for any other.
    pub fn upstreams(&self, service: &Service, port: u16) -> Arc<[Upstream]> {
        self.endpoints
            .get(&service.namespace)
            .and_then(|by_host| by_host.get(&service.hostname))
            .and_then(|by_port| by_port.get(&port))
            .cloned()
            .unwrap_or_else(|| self.list_upstreams(service, port))
    }

    fn list_upstreams(&self, service: &Service, port: u16) -> Arc<[Upstream]> {
        let default_target = service
            .ports
            .iter()
            .find(|p| p.service_port == port)
            .map(|p| {
                if p.target_port == 0 {
                    port
                } else {
                    p.target_port
                }
            })
            .unwrap_or(port);
        service
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| {
                let workload = self.workloads.get(&e.workload_uid)?;
                let identity = self.identities.get(&e.workload_uid)?;
                let ip = *workload.addresses.first()?;
                let target = e.ports.get(&port).copied().unwrap_or(default_target);
                Some(Upstream::mesh(
                    SocketAddr::new(ip, target),
                    identity.clone(),
                    workload.clone(),
                ))
            })
            .collect()
    }

    /// Policies bound to traffic for `service` through the waypoint `gateway`.
    pub fn policies_for(&self, gateway: &str, service: Option<&str>) -> Vec<&Policy> {
        self.policies
            .iter()
            .filter(|p| {
                p.target_gateway.as_deref() == Some(gateway)
                    || service.is_some_and(|s| p.target_service.as_deref() == Some(s))
            })
            .collect()
    }

    /// The JWT rules of the RequestAuthentications bound to traffic for `service` through
    /// the waypoint `gateway`, in `namespace/name` order.
    pub fn jwt_rules_for(&self, gateway: &str, service: Option<&str>) -> Vec<Arc<JwtRule>> {
        self.authns
            .iter()
            .filter(|a| {
                a.target_gateway.as_deref() == Some(gateway)
                    || service.is_some_and(|s| a.target_service.as_deref() == Some(s))
            })
            .flat_map(|a| a.rules.iter().cloned())
            .collect()
    }

    /// Every key-set URL a RequestAuthentication names.
    pub fn jwks_uris(&self) -> std::collections::BTreeSet<String> {
        self.authns
            .iter()
            .flat_map(|a| &a.rules)
            .filter_map(|r| match &r.keys {
                Keys::Uri(u) => Some(u.clone()),
                Keys::Inline(_) => None,
            })
            .collect()
    }

    /// Route rules attached to a service.
    pub fn rules(&self, service_key: &str) -> Option<&[Arc<Rule>]> {
        self.routes.get(service_key).map(Vec::as_slice)
    }

    /// Traffic policy settings of a service.
    pub fn settings(&self, service_key: &str) -> Option<&Arc<Settings>> {
        self.settings.get(service_key)
    }
}

/// Where a connection to external service `c` dialled at `authority` goes, and the host it named (`vip_host`:
/// the host of the VIP dialled, if it was one): the instances to try, in order. Empty
/// when the port is not declared or nothing is declared to go to.
fn external_upstreams(
    c: &Compiled,
    authority: SocketAddr,
    vip_host: Option<&str>,
) -> Vec<Upstream> {
    let x = &c.service;
    let port = x.ports.iter().find(|p| p.number == authority.port());
    // The host the client meant: the VIP's, else the first declared.
    let host = vip_host
        .or_else(|| x.hosts.first().map(String::as_str))
        .unwrap_or_default();
    let target = port.map(|p| {
        if p.target_port == 0 {
            p.number
        } else {
            p.target_port
        }
    });
    let direct = |dns: Option<&str>, port_number: Option<u16>| {
        let p = port_number.and_then(|n| x.ports.iter().find(|p| p.number == n));
        let tls = p.and_then(|p| {
            let config = c.tls(p.number)?.clone();
            let sni = match &p.tls {
                Some(t) if !t.sni.is_empty() => t.sni.clone(),
                _ => host.to_string(),
            };
            Some(Originate {
                server_name: rustls_pki_types::ServerName::try_from(sni).ok()?,
                config,
            })
        });
        Peer::External(Arc::new(Direct {
            service: c.key().to_string(),
            host: dns.map(str::to_string),
            tls,
            h2: p.is_some_and(|p| is_h2(&p.protocol)),
        }))
    };
    let dialled_endpoint = x
        .endpoints
        .iter()
        .any(|e| e.address.parse::<IpAddr>().ok() == Some(authority.ip()));
    // An endpoint dialled on its own port: that instance, as dialled.
    if port.is_none() {
        return if dialled_endpoint && x.matches(authority) {
            vec![Upstream {
                addr: authority,
                peer: direct(None, None),
            }]
        } else {
            Vec::new()
        };
    }
    let (Some(port), Some(target)) = (port, target) else {
        return Vec::new();
    };
    let on_endpoints = || {
        x.endpoints
            .iter()
            .map(|e| {
                let p = e.ports.get(&port.name).copied().unwrap_or(target);
                match e.address.parse::<IpAddr>() {
                    Ok(ip) => Upstream {
                        addr: SocketAddr::new(ip, p),
                        peer: direct(None, Some(port.number)),
                    },
                    // Resolution DNS: the name is resolved when dialling.
                    Err(_) => Upstream {
                        addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), p),
                        peer: direct(Some(&e.address), Some(port.number)),
                    },
                }
            })
            .collect::<Vec<_>>()
    };
    match x.resolution {
        Resolution::Static | Resolution::Dns if dialled_endpoint => vec![Upstream {
            addr: authority,
            peer: direct(None, Some(port.number)),
        }],
        Resolution::Static | Resolution::Dns if !x.endpoints.is_empty() => on_endpoints(),
        Resolution::Dns if !host.is_empty() && !host.starts_with('*') => vec![Upstream {
            addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), target),
            peer: direct(Some(host), Some(port.number)),
        }],
        // NONE: the address dialled, unless it was a VIP (which leads nowhere).
        Resolution::None if vip_host.is_none() => vec![Upstream {
            addr: SocketAddr::new(authority.ip(), target),
            peer: direct(None, Some(port.number)),
        }],
        _ => Vec::new(),
    }
}

/// The current state: one writer replaces it whole, readers take snapshots; background
/// work that follows the state (key-set fetching) watches [`StateHandle::changes`].
#[derive(Debug, Clone)]
pub struct StateHandle {
    inner: Arc<ArcSwap<State>>,
    /// Counts installed states.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for StateHandle {
    fn default() -> Self {
        StateHandle::new(State::default())
    }
}

impl StateHandle {
    /// A handle holding `state`.
    pub fn new(state: State) -> Self {
        StateHandle {
            inner: Arc::new(ArcSwap::from_pointee(state)),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Sees each state installed after it is called.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A snapshot for one decision.
    pub fn load(&self) -> Arc<State> {
        self.inner.load_full()
    }

    /// Replaces the state.
    pub fn store(&self, state: State) {
        self.inner.store(Arc::new(state));
        self.changes.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, namespace: &str, sa: &str, ip: &str) -> Workload {
        Workload {
            uid: format!("{namespace}/{name}"),
            name: name.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            addresses: vec![ip.parse().expect("ip")],
            ..Workload::default()
        }
    }

    #[test]
    fn a_caller_is_named_by_address_only_when_its_certificate_agrees() {
        let state = State::build(StateFile {
            workloads: vec![
                workload("client-0", "shop", "client", "10.0.0.1"),
                workload("old", "legacy", "default", "10.0.0.2"),
            ],
            ..StateFile::default()
        })
        .expect("state");
        let client: Identity = "spiffe://cluster.local/ns/shop/sa/client"
            .parse()
            .expect("id");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            state
                .workload_proving(ip("10.0.0.1"), &client)
                .map(|w| w.name.as_str()),
            Some("client-0")
        );
        // The certificate says shop/client; the address belongs to someone else.
        assert!(state.workload_proving(ip("10.0.0.2"), &client).is_none());
        assert!(state.workload_proving(ip("10.0.0.9"), &client).is_none());
    }

    fn external(yaml: &str) -> Compiled {
        Compiled::new(serde_yaml::from_str(yaml).expect("fixture")).expect("compiles")
    }

    /// Where `c` sends a connection dialled at `authority`, one line per instance.
    fn dests(c: &Compiled, authority: &str, vip_host: Option<&str>) -> Vec<String> {
        let authority = authority.parse().expect("addr");
        external_upstreams(c, authority, vip_host)
            .iter()
            .map(|u| match &u.peer {
                Peer::External(d) => format!(
                    "{}{}{}",
                    d.host
                        .as_deref()
                        .map(|h| format!("{h}@"))
                        .unwrap_or_default(),
                    u.addr,
                    d.tls
                        .as_ref()
                        .map(|t| format!(" tls={}", t.server_name.to_str()))
                        .unwrap_or_default()
                ),
                Peer::Mesh { .. } => "mesh".into(),
            })
            .collect()
    }

    #[test]
    fn external_services_go_where_their_resolution_says() {
        let none = external(
            "{name: a, namespace: x, hosts: [a.example], addresses: [192.0.2.0/24], \
             ports: [{number: 80, name: http, targetPort: 8080}]}",
        );
        assert_eq!(dests(&none, "192.0.2.7:80", None), ["192.0.2.7:8080"]);
        assert!(dests(&none, "192.0.2.7:81", None).is_empty());
        // NONE has nowhere to send a VIP.
        assert!(dests(&none, "240.240.0.1:80", Some("a.example")).is_empty());

        let fixed = external(
            "{name: s, namespace: x, hosts: [s.example], addresses: [203.0.113.1/32], \
             ports: [{number: 80, name: http}], resolution: STATIC, \
             endpoints: [{address: 198.51.100.7, ports: {http: 9090}}, {address: 198.51.100.8}]}",
        );
        assert_eq!(
            dests(&fixed, "203.0.113.1:80", None),
            ["198.51.100.7:9090", "198.51.100.8:80"]
        );
        // An endpoint dialled on its own port is that endpoint.
        assert_eq!(
            dests(&fixed, "198.51.100.7:9090", None),
            ["198.51.100.7:9090"]
        );

        let dns = external(
            "{name: d, namespace: x, hosts: [pay.example.com], \
             ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443, \
             tls: {caCertificates: ''}}], resolution: DNS}",
        );
        assert_eq!(
            dests(&dns, "240.240.0.9:80", Some("pay.example.com")),
            ["pay.example.com@0.0.0.0:443 tls=pay.example.com"]
        );
    }
}
