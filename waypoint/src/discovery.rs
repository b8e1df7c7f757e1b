//! The discovery client: what a push means to the waypoint. The stream itself (one
//! `Discovery.Subscribe` opened with `Hello{WAYPOINT, identity, gateway}`, ACK/NACK, the
//! bearer credential, reconnection with jittered exponential back-off) is
//! [`ambit_runtime::discovery`]'s, shared with ztunnel. Each push is applied to a copy of the
//! resources the waypoint holds, converted from protobuf at this edge (`TryFrom`, errors
//! naming the resource) and compiled into a [`State`]; only a push that converts and compiles
//! is installed and ACKed, any other is NACKed with the reason and the last good state keeps
//! serving. A reconnect starts from the full state the controller sends first.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::Identity;
use ambit_proto::discovery as pb;
use ambit_runtime::discovery::{
    self as stream, Backoff, ClientConfig, Connect, Status, Subscriber,
};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::authn::RequestAuthenticationResource;
use crate::external::{
    ExternalEndpoint, ExternalPort, ExternalService, ExternalTls, ExternalVip, Resolution,
};
use crate::resilience::TrafficPolicyResource;
use crate::route::RouteResource;
use crate::state::{
    Endpoint, Service, ServicePort, State, StateError, StateFile, StateHandle, Workload,
};

/// Why a push was refused (the NACK's reason).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// An address is neither 4 nor 16 bytes.
    #[error("{resource}: address of {len} bytes is neither IPv4 nor IPv6")]
    Address { resource: String, len: usize },
    /// An authorization policy does not decode (the shared engine names the field).
    #[error(transparent)]
    Policy(#[from] ambit_policy::WireError),
    /// A port does not fit in 16 bits.
    #[error("{resource}: port {port} out of range")]
    Port { resource: String, port: u32 },
    /// A route's or traffic policy's JSON spec does not parse.
    #[error("{resource}: spec_json: {source}")]
    Json {
        resource: String,
        #[source]
        source: serde_json::Error,
    },
    /// A network's prefix is longer than its address.
    #[error("{resource}: prefix length {prefix_len} is longer than the address")]
    Prefix { resource: String, prefix_len: u32 },
    /// An external service's resolution is none the waypoint knows.
    #[error("{resource}: resolution {value} is not NONE, STATIC or DNS")]
    Resolution { resource: String, value: i32 },
    /// A resource with no kind set.
    #[error("resource without a kind")]
    EmptyResource,
    /// The converted state does not compile.
    #[error(transparent)]
    State(#[from] StateError),
}

fn ip(resource: &str, bytes: &[u8]) -> Result<IpAddr, DiscoveryError> {
    ambit_proto::ip_from_bytes(bytes).map_err(|len| DiscoveryError::Address {
        resource: resource.to_string(),
        len,
    })
}

fn port(resource: &str, p: u32) -> Result<u16, DiscoveryError> {
    u16::try_from(p).map_err(|_| DiscoveryError::Port {
        resource: resource.to_string(),
        port: p,
    })
}

impl TryFrom<pb::Workload> for Workload {
    type Error = DiscoveryError;
    fn try_from(w: pb::Workload) -> Result<Self, DiscoveryError> {
        let name = format!("workload {}", w.uid);
        Ok(Workload {
            addresses: w
                .addresses
                .iter()
                .map(|a| ip(&name, a))
                .collect::<Result<_, _>>()?,
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            trust_domain: w.trust_domain,
            workload_name: w.workload_name,
        })
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = DiscoveryError;
    fn try_from(s: pb::Service) -> Result<Self, DiscoveryError> {
        let name = format!("service {}/{}", s.namespace, s.hostname);
        Ok(Service {
            vips: s
                .vips
                .iter()
                .map(|a| ip(&name, a))
                .collect::<Result<_, _>>()?,
            ports: s
                .ports
                .iter()
                .map(|p| {
                    Ok(ServicePort {
                        service_port: port(&name, p.service_port)?,
                        target_port: port(&name, p.target_port)?,
                        app_protocol: p.app_protocol.clone(),
                    })
                })
                .collect::<Result<_, DiscoveryError>>()?,
            endpoints: s
                .endpoints
                .iter()
                .map(|e| {
                    let ports = e
                        .ports
                        .iter()
                        .map(|(k, v)| Ok((port(&name, *k)?, port(&name, *v)?)))
                        .collect::<Result<BTreeMap<_, _>, DiscoveryError>>()?;
                    Ok(Endpoint {
                        workload_uid: e.workload_uid.clone(),
                        ports,
                        ready: e.ready,
                    })
                })
                .collect::<Result<_, DiscoveryError>>()?,
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
        })
    }
}

impl TryFrom<pb::Route> for RouteResource {
    type Error = DiscoveryError;
    fn try_from(r: pb::Route) -> Result<Self, DiscoveryError> {
        let spec = serde_json::from_str(&r.spec_json).map_err(|source| DiscoveryError::Json {
            resource: format!("route {}/{}", r.namespace, r.name),
            source,
        })?;
        Ok(RouteResource {
            name: r.name,
            namespace: r.namespace,
            kind: r.kind,
            parent_services: r.parent_services,
            spec,
        })
    }
}

impl TryFrom<pb::TrafficPolicy> for TrafficPolicyResource {
    type Error = DiscoveryError;
    fn try_from(t: pb::TrafficPolicy) -> Result<Self, DiscoveryError> {
        let spec = serde_json::from_str(&t.spec_json).map_err(|source| DiscoveryError::Json {
            resource: format!("traffic policy {}/{}", t.namespace, t.name),
            source,
        })?;
        Ok(TrafficPolicyResource {
            name: t.name,
            namespace: t.namespace,
            target_service: t.target_service,
            spec,
        })
    }
}

impl TryFrom<pb::RequestAuthentication> for RequestAuthenticationResource {
    type Error = DiscoveryError;
    fn try_from(a: pb::RequestAuthentication) -> Result<Self, DiscoveryError> {
        let spec = serde_json::from_str(&a.spec_json).map_err(|source| DiscoveryError::Json {
            resource: format!("request authentication {}/{}", a.namespace, a.name),
            source,
        })?;
        Ok(RequestAuthenticationResource {
            name: a.name,
            namespace: a.namespace,
            target_gateway: a.target_gateway,
            target_service: a.target_service,
            spec,
        })
    }
}

impl TryFrom<pb::ExternalService> for ExternalService {
    type Error = DiscoveryError;
    fn try_from(x: pb::ExternalService) -> Result<Self, DiscoveryError> {
        let name = format!("external service {}/{}", x.namespace, x.name);
        let addresses = x
            .addresses
            .iter()
            .map(|b| {
                let ip = ip(&name, &b.address)?;
                u8::try_from(b.prefix_len)
                    .ok()
                    .and_then(|len| IpNet::new(ip, len).ok())
                    .ok_or(DiscoveryError::Prefix {
                        resource: name.clone(),
                        prefix_len: b.prefix_len,
                    })
            })
            .collect::<Result<_, _>>()?;
        let ports = x
            .ports
            .iter()
            .map(|p| {
                Ok(ExternalPort {
                    number: port(&name, p.number)?,
                    name: p.name.clone(),
                    protocol: p.protocol.clone(),
                    target_port: port(&name, p.target_port)?,
                    tls: p.tls.as_ref().map(|t| ExternalTls {
                        sni: t.sni.clone(),
                        ca_certificates: t.ca_certificates.clone(),
                    }),
                })
            })
            .collect::<Result<_, DiscoveryError>>()?;
        let endpoints = x
            .endpoints
            .iter()
            .map(|e| {
                let ports = e
                    .ports
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), port(&name, *v)?)))
                    .collect::<Result<BTreeMap<_, _>, DiscoveryError>>()?;
                Ok(ExternalEndpoint {
                    address: e.address.clone(),
                    ports,
                })
            })
            .collect::<Result<_, DiscoveryError>>()?;
        let vips = x
            .vips
            .iter()
            .map(|v| {
                Ok(ExternalVip {
                    host: v.host.clone(),
                    address: ip(&name, &v.address)?,
                })
            })
            .collect::<Result<_, DiscoveryError>>()?;
        Ok(ExternalService {
            resolution: match pb::ExternalResolution::try_from(x.resolution) {
                Ok(pb::ExternalResolution::Static) => Resolution::Static,
                Ok(pb::ExternalResolution::Dns) => Resolution::Dns,
                Ok(pb::ExternalResolution::None) => Resolution::None,
                Err(_) => {
                    return Err(DiscoveryError::Resolution {
                        resource: name,
                        value: x.resolution,
                    })
                }
            },
            name: x.name,
            namespace: x.namespace,
            hosts: x.hosts,
            addresses,
            ports,
            endpoints,
            vips,
        })
    }
}

/// The key a resource is stored under (the proto's `ResourceKey`).
fn key_of(r: &pb::Resource) -> Option<(i32, String)> {
    use pb::resource::Kind;
    Some(match r.kind.as_ref()? {
        Kind::Workload(w) => (pb::ResourceKind::Workload as i32, w.uid.clone()),
        Kind::Service(s) => (
            pb::ResourceKind::Service as i32,
            format!("{}/{}", s.namespace, s.hostname),
        ),
        Kind::Authorization(a) => (
            pb::ResourceKind::Authorization as i32,
            format!("{}/{}", a.namespace, a.name),
        ),
        Kind::Route(r) => (
            pb::ResourceKind::Route as i32,
            format!("{}/{}", r.namespace, r.name),
        ),
        Kind::TrafficPolicy(t) => (
            pb::ResourceKind::TrafficPolicy as i32,
            format!("{}/{}", t.namespace, t.name),
        ),
        Kind::PeerAuthentication(p) => (
            pb::ResourceKind::PeerAuthentication as i32,
            format!("{}/{}", p.namespace, p.name),
        ),
        Kind::RequestAuthentication(a) => (
            pb::ResourceKind::RequestAuthentication as i32,
            format!("{}/{}", a.namespace, a.name),
        ),
        Kind::ExternalService(x) => (
            pb::ResourceKind::ExternalService as i32,
            format!("{}/{}", x.namespace, x.name),
        ),
    })
}

/// The resources held, as received.
#[derive(Debug, Default, Clone)]
pub struct Resources(BTreeMap<(i32, String), pb::Resource>);

impl Resources {
    /// Applies `push` to a copy; returns the copy and the state it compiles to.
    pub fn apply(&self, push: &pb::Push) -> Result<(Resources, State), DiscoveryError> {
        let mut next = if push.full_state {
            Resources::default()
        } else {
            self.clone()
        };
        for k in &push.removals {
            next.0.remove(&(k.kind, k.name.clone()));
        }
        for r in &push.upserts {
            let key = key_of(r).ok_or(DiscoveryError::EmptyResource)?;
            next.0.insert(key, r.clone());
        }
        let state = State::build(next.to_file()?)?;
        Ok((next, state))
    }

    fn to_file(&self) -> Result<StateFile, DiscoveryError> {
        use pb::resource::Kind;
        let mut f = StateFile::default();
        for r in self.0.values() {
            match r.kind.clone().ok_or(DiscoveryError::EmptyResource)? {
                Kind::Workload(w) => f.workloads.push(w.try_into()?),
                Kind::Service(s) => f.services.push(s.try_into()?),
                Kind::Authorization(a) => f.policies.push(a.try_into()?),
                Kind::Route(r) => f.routes.push(r.try_into()?),
                Kind::TrafficPolicy(t) => f.traffic_policies.push(t.try_into()?),
                // ztunnel's business (inbound plaintext); the waypoint does not ask for it.
                Kind::PeerAuthentication(_) => {}
                // Only those bound to this waypoint are sent: it dials them.
                Kind::ExternalService(x) => f.external_services.push(x.try_into()?),
                Kind::RequestAuthentication(a) => f.request_authentications.push(a.try_into()?),
            }
        }
        Ok(f)
    }
}

/// As whom to subscribe.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub identity: Identity,
    /// `namespace/name`.
    pub gateway: String,
    /// File holding the bearer token (a projected service account token, or the local-mode
    /// credential), re-read for every stream.
    pub credential_file: Option<PathBuf>,
    /// The metrics port announced to the controller (its dashboard scrapes it).
    pub metrics_port: Option<u16>,
}

/// The waypoint's reconnection back-off: from half a second up to 30 s.
pub const BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

/// Runs the client forever over `connector` ([`ambit_runtime::control::channel`], or a
/// plaintext endpoint in tests): `ready` turns true after the first installed state, and
/// `status` says what the stream is doing.
pub async fn run(
    connector: impl Connect,
    config: DiscoveryConfig,
    state: StateHandle,
    ready: Arc<AtomicBool>,
    status: watch::Sender<Status>,
) {
    let subscriber = Waypoint {
        identity: config.identity,
        gateway: config.gateway,
        state,
        ready,
        resources: Resources::default(),
    };
    let client = ClientConfig {
        backoff: BACKOFF,
        credential_file: config.credential_file,
        metrics_port: config.metrics_port,
    };
    stream::run(connector, subscriber, client, status).await
}

/// What a push means to the waypoint.
struct Waypoint {
    identity: Identity,
    gateway: String,
    state: StateHandle,
    ready: Arc<AtomicBool>,
    /// The resources of the state installed.
    resources: Resources,
}

impl Subscriber for Waypoint {
    type Error = DiscoveryError;

    fn hello(&self) -> pb::Hello {
        pb::Hello {
            kind: pb::ProxyKind::Waypoint as i32,
            node: String::new(),
            identity: self.identity.to_string(),
            gateway: self.gateway.clone(),
            // Kinds beyond the first five it decodes (it never receives PeerAuthentications).
            accepts: vec![
                pb::ResourceKind::RequestAuthentication as i32,
                pb::ResourceKind::ExternalService as i32,
            ],
        }
    }

    fn apply(&mut self, push: pb::Push) -> Result<u64, DiscoveryError> {
        let (next, compiled) = self.resources.apply(&push)?;
        self.resources = next;
        self.state.store(compiled);
        self.ready.store(true, Ordering::Release);
        tracing::info!(version = push.version, nonce = %push.nonce, "state installed");
        Ok(push.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, addr: Vec<u8>) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "demo".into(),
                service_account: "sa".into(),
                trust_domain: "cluster.local".into(),
                addresses: vec![addr],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn pushes_apply_and_bad_ones_are_refused() {
        let full = pb::Push {
            nonce: "1".into(),
            full_state: true,
            version: 1,
            upserts: vec![
                workload("a", vec![10, 0, 0, 1]),
                pb::Resource {
                    kind: Some(pb::resource::Kind::Authorization(pb::Authorization {
                        name: "deny".into(),
                        namespace: "demo".into(),
                        action: pb::PolicyAction::Deny as i32,
                        rules: vec![pb::Rule {
                            to: vec![pb::Operation {
                                paths: vec![pb::StringMatch {
                                    r#match: Some(pb::string_match::Match::Prefix("/admin".into())),
                                }],
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                        target_gateway: "demo/wp".into(),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        let (held, state) = Resources::default().apply(&full).expect("full push");
        assert!(state
            .workload_by_ip("10.0.0.1".parse().expect("ip"))
            .is_some());
        assert_eq!(state.policies_for("demo/wp", None).len(), 1);

        let bad = pb::Push {
            nonce: "2".into(),
            upserts: vec![workload("b", vec![1, 2, 3])],
            ..Default::default()
        };
        let err = held.apply(&bad).expect_err("3-byte address");
        assert!(err.to_string().contains("workload b"), "{err}");

        let bad_route = pb::Push {
            nonce: "3".into(),
            upserts: vec![pb::Resource {
                kind: Some(pb::resource::Kind::Route(pb::Route {
                    name: "r".into(),
                    namespace: "demo".into(),
                    kind: "HTTPRoute".into(),
                    spec_json: "{not json".into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert!(held.apply(&bad_route).is_err());

        let removal = pb::Push {
            nonce: "4".into(),
            removals: vec![pb::ResourceKey {
                kind: pb::ResourceKind::Workload as i32,
                name: "a".into(),
            }],
            ..Default::default()
        };
        let (_, state) = held.apply(&removal).expect("removal");
        assert!(state
            .workload_by_ip("10.0.0.1".parse().expect("ip"))
            .is_none());
    }

    #[test]
    fn request_authentications_compile_or_are_refused_naming_the_field() {
        let ra = |name: &str, spec_json: &str| pb::Resource {
            kind: Some(pb::resource::Kind::RequestAuthentication(
                pb::RequestAuthentication {
                    name: name.into(),
                    namespace: "demo".into(),
                    target_gateway: "demo/wp".into(),
                    spec_json: spec_json.into(),
                    ..Default::default()
                },
            )),
        };
        let push = |nonce: &str, r: pb::Resource| pb::Push {
            nonce: nonce.into(),
            upserts: vec![r],
            ..Default::default()
        };
        let good = r#"{"jwtRules": [{"issuer": "https://idp.example", "jwksUri": "https://idp.example/keys"}]}"#;
        let (held, state) = Resources::default()
            .apply(&push("1", ra("idp", good)))
            .expect("good push");
        assert_eq!(state.jwt_rules_for("demo/wp", None).len(), 1);
        assert_eq!(
            state.jwks_uris().into_iter().collect::<Vec<_>>(),
            vec!["https://idp.example/keys"]
        );
        let not_json = r#"{"jwtRules": [{"issuer": "i", "jwks": "{oops"}]}"#;
        let err = held
            .apply(&push("2", ra("bad", not_json)))
            .expect_err("bad key set");
        assert_eq!(
            err.to_string(),
            "request authentication demo/bad: jwtRules[0].jwks is not a JSON Web Key Set"
        );
        let err = held
            .apply(&push("3", ra("worse", "[")))
            .expect_err("bad spec");
        assert!(
            err.to_string()
                .starts_with("request authentication demo/worse: spec_json"),
            "{err}"
        );
    }
    #[test]
    fn external_services_convert_or_are_refused_naming_the_field() {
        let xs = |prefix_len: u32, ca: &str| pb::Resource {
            kind: Some(pb::resource::Kind::ExternalService(pb::ExternalService {
                name: "pay".into(),
                namespace: "demo".into(),
                hosts: vec!["pay.example.com".into()],
                addresses: vec![pb::IpBlock {
                    address: vec![192, 0, 2, 0],
                    prefix_len,
                }],
                ports: vec![pb::ExternalPort {
                    number: 80,
                    name: "http".into(),
                    protocol: "HTTP".into(),
                    target_port: 443,
                    tls: Some(pb::ExternalTls {
                        sni: String::new(),
                        ca_certificates: ca.into(),
                    }),
                }],
                resolution: pb::ExternalResolution::Dns as i32,
                vips: vec![pb::ExternalVip {
                    host: "pay.example.com".into(),
                    address: vec![240, 240, 0, 7],
                }],
                ..Default::default()
            })),
        };
        let push = |nonce: &str, r: pb::Resource| pb::Push {
            nonce: nonce.into(),
            upserts: vec![r],
            ..Default::default()
        };
        let (held, state) = Resources::default()
            .apply(&push("1", xs(24, "")))
            .expect("good push");
        match state.resolve("240.240.0.7:80".parse().expect("addr")) {
            Some(crate::state::Target::External {
                host, upstreams, ..
            }) => {
                assert_eq!(host, "pay.example.com");
                assert_eq!(upstreams[0].describe(), "pay.example.com:443");
            }
            other => panic!("not the external service: {other:?}"),
        }
        assert!(state
            .resolve("192.0.2.9:80".parse().expect("addr"))
            .is_some());
        let err = held.apply(&push("2", xs(33, ""))).expect_err("bad prefix");
        assert_eq!(
            err.to_string(),
            "external service demo/pay: prefix length 33 is longer than the address"
        );
        let err = held
            .apply(&push("3", xs(24, "not pem")))
            .expect_err("bad roots");
        assert_eq!(
            err.to_string(),
            "external service demo/pay: port 80: tls: caCertificates holds no certificate"
        );
    }
}
