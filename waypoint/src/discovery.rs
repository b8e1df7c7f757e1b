//! The discovery client: one `Discovery.Subscribe` stream to the controller, opened with
//! `Hello{WAYPOINT, identity, gateway}`. Each push is applied to a copy of the resources the
//! waypoint holds, converted from protobuf at this edge (`TryFrom`, errors naming the
//! resource) and compiled into a [`State`]; only a push that converts and compiles is
//! installed and ACKed, any other is NACKed with the reason and the last good state keeps
//! serving. The stream reconnects with jittered exponential back-off; a reconnect starts
//! from the full state the controller sends first.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::Identity;
use ambit_proto::discovery as pb;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::resilience::TrafficPolicyResource;
use crate::route::RouteResource;
use crate::state::{
    Endpoint, Service, ServicePort, State, StateError, StateFile, StateHandle, Workload,
};

/// Why a push or a stream failed.
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
    /// A resource with no kind set.
    #[error("resource without a kind")]
    EmptyResource,
    /// The converted state does not compile.
    #[error(transparent)]
    State(#[from] StateError),
    /// The channel to the controller could not be set up.
    #[error("controller channel: {0}")]
    Channel(#[source] ambit_hbone::control::ControlError),
    /// The subscription was refused or the stream failed.
    #[error("discovery stream: {0}")]
    Stream(#[source] tonic::Status),
    /// The controller closed the stream.
    #[error("discovery stream closed by the controller")]
    Closed,
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
            }
        }
        Ok(f)
    }
}

/// Where and as whom to subscribe.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// `https://host:15012` or `host:port`.
    pub address: String,
    pub controller_identity: Identity,
    pub identity: Identity,
    /// `namespace/name`.
    pub gateway: String,
    /// Mesh roots (PEM) the controller's certificate chains to.
    pub roots_pem: String,
    /// Bearer token (a projected service account token, or the local-mode credential).
    pub token: Option<String>,
}

/// Runs the client forever: reconnects with back-off, `ready` turns true after the first
/// installed state.
pub async fn run(config: DiscoveryConfig, state: StateHandle, ready: Arc<AtomicBool>) {
    let connect = |c: &DiscoveryConfig| {
        ambit_hbone::control::channel(&c.address, &c.roots_pem, &c.controller_identity)
            .map_err(DiscoveryError::Channel)
    };
    run_with(config, state, ready, connect).await
}

/// [`run`] with the channel to the controller made by `connect` (tests use plaintext).
pub async fn run_with(
    config: DiscoveryConfig,
    state: StateHandle,
    ready: Arc<AtomicBool>,
    connect: impl Fn(&DiscoveryConfig) -> Result<Channel, DiscoveryError>,
) {
    let mut resources = Resources::default();
    let mut delay = Duration::from_millis(500);
    loop {
        let mut established = false;
        let err = match connect(&config) {
            Ok(channel) => {
                session(
                    channel,
                    &config,
                    &state,
                    &ready,
                    &mut resources,
                    &mut established,
                )
                .await
            }
            Err(e) => e,
        };
        if established {
            // The controller was there; a restart should not wait out an old back-off.
            delay = Duration::from_millis(500);
        }
        tracing::warn!(error = %err, retry_in = ?delay, "discovery stream ended; serving the last good state");
        let jitter = rand::rng().random_range(0.5..1.0);
        tokio::time::sleep(delay.mul_f64(jitter)).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn session(
    channel: Channel,
    config: &DiscoveryConfig,
    state: &StateHandle,
    ready: &AtomicBool,
    resources: &mut Resources,
    established: &mut bool,
) -> DiscoveryError {
    let mut client = pb::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::SubscribeRequest {
        message: Some(pb::subscribe_request::Message::Hello(pb::Hello {
            kind: pb::ProxyKind::Waypoint as i32,
            node: String::new(),
            identity: config.identity.to_string(),
            gateway: config.gateway.clone(),
        })),
    };
    if tx.send(hello).await.is_err() {
        return DiscoveryError::Closed;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &config.token {
        if let Ok(v) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", v);
        }
    }
    let mut stream = match client.subscribe(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return DiscoveryError::Stream(status),
    };
    *established = true;
    tracing::info!(gateway = %config.gateway, "discovery stream established");
    loop {
        let push = match stream.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return DiscoveryError::Closed,
            Err(status) => return DiscoveryError::Stream(status),
        };
        let nonce = push.nonce.clone();
        let reply = match resources.apply(&push) {
            Ok((next, compiled)) => {
                *resources = next;
                state.store(compiled);
                ready.store(true, Ordering::Release);
                tracing::info!(version = push.version, %nonce, "state installed");
                pb::subscribe_request::Message::Ack(pb::Ack { nonce })
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(%nonce, %reason, "push refused; keeping the last good state");
                pb::subscribe_request::Message::Nack(pb::Nack { nonce, reason })
            }
        };
        if tx
            .send(pb::SubscribeRequest {
                message: Some(reply),
            })
            .await
            .is_err()
        {
            return DiscoveryError::Closed;
        }
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
}
