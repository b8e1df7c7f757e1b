//! External services (destinations outside the mesh declared to it) and the outbound policy
//! that makes them matter: under `REGISTRY_ONLY` a pod may only reach mesh destinations and
//! these.
//!
//! A connection is an external service's when its destination address is in the service's
//! `addresses` (or is one of its STATIC endpoints) and its port is one the service declares
//! (a port number, or an endpoint's own port for that endpoint).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_proto::discovery as pb;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::gateway::GatewayAddress;
use super::{ip_from_bytes, port_from_u32, ConvertError};

/// What a workload may reach outside the mesh (its namespace's choice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Anything: a destination the mesh does not know is passed through.
    #[default]
    AllowAny,
    /// Mesh destinations and declared external services only.
    RegistryOnly,
}

impl OutboundPolicy {
    /// How logs name it.
    pub fn as_str(&self) -> &'static str {
        match self {
            OutboundPolicy::AllowAny => "ALLOW_ANY",
            OutboundPolicy::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

/// How the real destination of an external service is found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// The address the client dialled.
    #[default]
    None,
    /// One of the endpoints.
    Static,
    /// An address the host name resolves to.
    Dns,
}

/// One declared port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalPort {
    pub number: u16,
    pub name: Arc<str>,
    pub protocol: Arc<str>,
    /// The instances' port when it differs from `number`.
    pub target_port: Option<u16>,
}

/// One instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalEndpoint {
    /// An IP, or a host name with resolution DNS.
    pub address: Arc<str>,
    /// Instance ports by the service port's name.
    pub ports: BTreeMap<Arc<str>, u16>,
}

/// A destination outside the mesh that workloads may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalService {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub hosts: Vec<Arc<str>>,
    pub addresses: Vec<IpNet>,
    pub ports: Vec<ExternalPort>,
    pub resolution: Resolution,
    pub endpoints: Vec<ExternalEndpoint>,
    /// The VIPs the mesh allocated to its hosts: what the DNS proxy answers for a host, and
    /// what a client then dials.
    #[serde(default)]
    pub vips: Vec<ExternalVip>,
    /// The waypoint the service is bound to: its connections are tunnelled there (where L7
    /// policy applies and the real destination is dialled), never sent out from the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

/// A VIP the controller allocated to one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalVip {
    pub host: Arc<str>,
    pub address: IpAddr,
}

impl ExternalService {
    /// "namespace/name": the store's key, and how logs name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// True when a connection to `dst` is this service's: the address is one of its
    /// networks on a declared port, or one of its endpoints on a declared port or that
    /// endpoint's own port.
    pub fn matches(&self, dst: SocketAddr) -> bool {
        let (ip, port) = (dst.ip().to_canonical(), dst.port());
        let declared = self.ports.iter().any(|p| p.number == port);
        if declared && self.addresses.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        self.endpoints.iter().any(|e| {
            e.address.parse::<IpAddr>().ok() == Some(ip)
                && (declared
                    || self
                        .ports
                        .iter()
                        .any(|p| e.ports.get(&p.name).copied().or(p.target_port) == Some(port)))
        })
    }
}

impl TryFrom<pb::ExternalService> for ExternalService {
    type Error = ConvertError;

    fn try_from(x: pb::ExternalService) -> Result<Self, ConvertError> {
        let resource = || format!("external service {}/{}", x.namespace, x.name);
        if x.name.is_empty() {
            return Err(ConvertError::Missing {
                resource: resource(),
                field: "name",
            });
        }
        if x.hosts.is_empty() {
            return Err(ConvertError::Missing {
                resource: resource(),
                field: "hosts",
            });
        }
        let mut addresses = Vec::with_capacity(x.addresses.len());
        for (i, b) in x.addresses.iter().enumerate() {
            let field = || format!("addresses[{i}]");
            let ip = ip_from_bytes(&resource, &field, &b.address)?;
            let net = u8::try_from(b.prefix_len)
                .ok()
                .and_then(|len| IpNet::new(ip, len).ok())
                .ok_or_else(|| ConvertError::Invalid {
                    resource: resource(),
                    field: format!("addresses[{i}].prefix_len"),
                    value: b.prefix_len.to_string(),
                    why: "longer than the address".into(),
                })?;
            addresses.push(net);
        }
        let mut ports = Vec::with_capacity(x.ports.len());
        for (i, p) in x.ports.iter().enumerate() {
            let number =
                port_from_u32(&resource, &|| format!("ports[{i}].number"), p.number, false)?;
            let target = port_from_u32(
                &resource,
                &|| format!("ports[{i}].target_port"),
                p.target_port,
                true,
            )?;
            ports.push(ExternalPort {
                number,
                name: p.name.as_str().into(),
                protocol: p.protocol.as_str().into(),
                target_port: (target != 0).then_some(target),
            });
        }
        let resolution = match pb::ExternalResolution::try_from(x.resolution) {
            Ok(pb::ExternalResolution::None) => Resolution::None,
            Ok(pb::ExternalResolution::Static) => Resolution::Static,
            Ok(pb::ExternalResolution::Dns) => Resolution::Dns,
            Err(_) => {
                return Err(ConvertError::Invalid {
                    resource: resource(),
                    field: "resolution".into(),
                    value: x.resolution.to_string(),
                    why: "not NONE, STATIC or DNS".into(),
                })
            }
        };
        let mut endpoints = Vec::with_capacity(x.endpoints.len());
        for (i, e) in x.endpoints.iter().enumerate() {
            if resolution == Resolution::Static && e.address.parse::<IpAddr>().is_err() {
                return Err(ConvertError::Invalid {
                    resource: resource(),
                    field: format!("endpoints[{i}].address"),
                    value: e.address.clone(),
                    why: "resolution STATIC needs IP addresses".into(),
                });
            }
            let mut eports = BTreeMap::new();
            for (name, n) in &e.ports {
                let p = port_from_u32(
                    &resource,
                    &|| format!("endpoints[{i}].ports[{name}]"),
                    *n,
                    false,
                )?;
                eports.insert(name.as_str().into(), p);
            }
            endpoints.push(ExternalEndpoint {
                address: e.address.as_str().into(),
                ports: eports,
            });
        }
        let mut vips = Vec::with_capacity(x.vips.len());
        for (i, v) in x.vips.iter().enumerate() {
            let address = ip_from_bytes(&resource, &|| format!("vips[{i}].address"), &v.address)?;
            vips.push(ExternalVip {
                host: v.host.as_str().into(),
                address,
            });
        }
        let waypoint = match x.waypoint.clone() {
            Some(gw) => Some(GatewayAddress::from_proto(&resource, "waypoint", gw)?),
            None => None,
        };
        Ok(ExternalService {
            vips,
            waypoint,
            name: x.name.as_str().into(),
            namespace: x.namespace.as_str().into(),
            hosts: x.hosts.iter().map(|h| h.as_str().into()).collect(),
            addresses,
            ports,
            resolution,
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> pb::ExternalService {
        pb::ExternalService {
            name: "api".into(),
            namespace: "demo".into(),
            hosts: vec!["api.example.com".into()],
            addresses: vec![pb::IpBlock {
                address: vec![192, 0, 2, 0],
                prefix_len: 24,
            }],
            ports: vec![pb::ExternalPort {
                number: 443,
                name: "https".into(),
                protocol: "HTTPS".into(),
                target_port: 0,
                tls: None,
            }],
            resolution: pb::ExternalResolution::Static as i32,
            endpoints: vec![pb::ExternalEndpoint {
                address: "198.51.100.7".into(),
                ports: [("https".to_string(), 8443)].into(),
            }],
            vips: Vec::new(),
            waypoint: None,
        }
    }

    #[test]
    fn matches_by_network_or_endpoint_and_port() {
        let x = ExternalService::try_from(wire()).expect("valid");
        let at = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(x.matches(at("192.0.2.77:443")));
        assert!(x.matches(at("[::ffff:192.0.2.77]:443")));
        assert!(!x.matches(at("192.0.2.77:80")), "undeclared port");
        assert!(!x.matches(at("192.0.3.1:443")), "outside the network");
        assert!(x.matches(at("198.51.100.7:443")));
        assert!(
            x.matches(at("198.51.100.7:8443")),
            "the endpoint's own port"
        );
        assert!(!x.matches(at("198.51.100.7:22")));
    }

    #[test]
    fn bad_wire_fields_are_named() {
        type Mutate = Box<dyn Fn(&mut pb::ExternalService)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|x| x.hosts.clear()), "hosts is empty"),
            (Box::new(|x| x.ports[0].number = 70000), "ports[0].number"),
            (
                Box::new(|x| x.addresses[0].prefix_len = 40),
                "addresses[0].prefix_len",
            ),
            (
                Box::new(|x| x.addresses[0].address = vec![1, 2, 3]),
                "addresses[0]",
            ),
            (
                Box::new(|x| x.endpoints[0].address = "db.example".into()),
                "endpoints[0].address",
            ),
            (Box::new(|x| x.resolution = 9), "resolution"),
        ];
        for (mutate, want) in cases {
            let mut w = wire();
            mutate(&mut w);
            let err = ExternalService::try_from(w).expect_err(want).to_string();
            assert!(err.starts_with("external service demo/api: "), "{err}");
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }
}
