//! Services: virtual IPs in front of a set of workloads.
//!
//! ztunnel resolves a connection to a VIP itself (there is no kube-proxy hop in the mesh):
//! it picks an endpoint and tunnels to it, or hands the connection to the service's waypoint.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ambit_proto::discovery as pb;
use serde::{Deserialize, Serialize};

use super::workload::GatewayAddress;
use super::{ip_from_bytes, port_from_u32, ConvertError};

/// How ztunnel spreads connections over a service's endpoints (after locality preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancing {
    /// Uniformly at random (the default).
    #[default]
    Random,
    /// The endpoint with the fewest connections this ztunnel holds open to it.
    LeastConnections,
    /// Each endpoint in turn.
    RoundRobin,
}

/// One port a service exposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Port on the VIP.
    pub port: u16,
    /// Port on the endpoints (equal to `port` when the controller left it unset).
    pub target_port: u16,
    pub name: Arc<str>,
    /// appProtocol ("HTTP", "GRPC"...), informational for ztunnel.
    pub app_protocol: Arc<str>,
}

/// A workload backing a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The backing workload's uid.
    pub workload_uid: Arc<str>,
    /// Per-endpoint target ports, keyed by service port, when they differ from the service's.
    pub ports: BTreeMap<u16, u16>,
    /// Passing its readiness probe: only ready endpoints receive new connections.
    pub ready: bool,
}

/// A Kubernetes Service, as ztunnel needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// "name.namespace.svc.cluster.local"
    pub hostname: Arc<str>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// Waypoint that traffic to this service must traverse.
    pub waypoint: Option<GatewayAddress>,
    pub load_balancing: LoadBalancing,
}

impl Service {
    /// The store key the protocol uses for services: "namespace/hostname".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The port entry for a VIP port, if the service exposes it.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The port an endpoint listens on for `port` of the service.
    pub fn target_port(&self, endpoint: &Endpoint, port: &ServicePort) -> u16 {
        endpoint
            .ports
            .get(&port.port)
            .copied()
            .unwrap_or(port.target_port)
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = ConvertError;

    fn try_from(s: pb::Service) -> Result<Self, Self::Error> {
        let resource = || format!("service {}/{}", s.namespace, s.name);
        let missing = |field| ConvertError::Missing {
            resource: resource(),
            field,
        };
        if s.name.is_empty() {
            return Err(missing("name"));
        }
        if s.namespace.is_empty() {
            return Err(missing("namespace"));
        }
        let hostname: Arc<str> = if s.hostname.is_empty() {
            format!("{}.{}.svc.cluster.local", s.name, s.namespace).into()
        } else {
            s.hostname.as_str().into()
        };
        let mut vips = Vec::with_capacity(s.vips.len());
        for (i, raw) in s.vips.iter().enumerate() {
            let ip = ip_from_bytes(&resource, &|| format!("vip {i}"), raw)?;
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
        let mut ports: Vec<ServicePort> = Vec::with_capacity(s.ports.len());
        for (i, p) in s.ports.iter().enumerate() {
            let port = port_from_u32(
                &resource,
                &|| format!("ports[{i}].service_port"),
                p.service_port,
                false,
            )?;
            let target_port = match port_from_u32(
                &resource,
                &|| format!("ports[{i}].target_port"),
                p.target_port,
                true,
            )? {
                0 => port,
                t => t,
            };
            if ports.iter().any(|q| q.port == port) {
                return Err(ConvertError::Invalid {
                    resource: resource(),
                    field: format!("ports[{i}].service_port"),
                    value: port.to_string(),
                    why: "listed twice".into(),
                });
            }
            ports.push(ServicePort {
                port,
                target_port,
                name: p.name.as_str().into(),
                app_protocol: p.app_protocol.as_str().into(),
            });
        }
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        for (i, e) in s.endpoints.iter().enumerate() {
            if e.workload_uid.is_empty() {
                return Err(ConvertError::Invalid {
                    resource: resource(),
                    field: format!("endpoints[{i}].workload_uid"),
                    value: String::new(),
                    why: "empty".into(),
                });
            }
            let mut eports = BTreeMap::new();
            for (&sp, &tp) in &e.ports {
                let sp = port_from_u32(
                    &resource,
                    &|| format!("endpoints[{i}].ports key"),
                    sp,
                    false,
                )?;
                let tp = port_from_u32(
                    &resource,
                    &|| format!("endpoints[{i}].ports[{sp}]"),
                    tp,
                    false,
                )?;
                eports.insert(sp, tp);
            }
            endpoints.push(Endpoint {
                workload_uid: e.workload_uid.as_str().into(),
                ports: eports,
                ready: e.ready,
            });
        }
        let waypoint = match s.waypoint.clone() {
            Some(gw) => Some(GatewayAddress::from_proto(&resource, "waypoint", gw)?),
            None => None,
        };
        let load_balancing = match pb::LoadBalancing::try_from(s.load_balancing) {
            Ok(pb::LoadBalancing::Unspecified | pb::LoadBalancing::Random) => LoadBalancing::Random,
            Ok(pb::LoadBalancing::LeastConnections) => LoadBalancing::LeastConnections,
            Ok(pb::LoadBalancing::RoundRobin) => LoadBalancing::RoundRobin,
            Err(_) => {
                return Err(ConvertError::Invalid {
                    resource: resource(),
                    field: "load_balancing".into(),
                    value: s.load_balancing.to_string(),
                    why: "unknown mode".into(),
                })
            }
        };
        Ok(Service {
            name: s.name.as_str().into(),
            namespace: s.namespace.as_str().into(),
            hostname,
            vips,
            ports,
            endpoints,
            waypoint,
            load_balancing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Mutate = Box<dyn Fn(&mut pb::Service)>;

    fn base() -> pb::Service {
        pb::Service {
            name: "web".into(),
            namespace: "default".into(),
            vips: vec![vec![10, 96, 0, 10]],
            ports: vec![pb::ServicePort {
                service_port: 80,
                target_port: 8080,
                name: "http".into(),
                app_protocol: "HTTP".into(),
            }],
            endpoints: vec![pb::Endpoint {
                workload_uid: "u1".into(),
                ports: [(80, 8081)].into(),
                ready: true,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn converts() {
        let s = Service::try_from(base()).unwrap();
        assert_eq!(&*s.hostname, "web.default.svc.cluster.local");
        assert_eq!(s.key(), "default/web.default.svc.cluster.local");
        let port = s.port(80).unwrap();
        assert_eq!(port.target_port, 8080);
        assert_eq!(s.target_port(&s.endpoints[0], port), 8081);
        assert_eq!(s.load_balancing, LoadBalancing::Random);
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        let cases: Vec<(Mutate, &str)> = vec![
            (
                Box::new(|s| s.vips.push(vec![1, 2])),
                "service default/web: vip 1 is 2 bytes",
            ),
            (
                Box::new(|s| s.ports[0].service_port = 0),
                "ports[0].service_port \"0\"",
            ),
            (
                Box::new(|s| s.ports[0].target_port = 65536),
                "ports[0].target_port \"65536\"",
            ),
            (
                Box::new(|s| s.endpoints[0].workload_uid.clear()),
                "endpoints[0].workload_uid",
            ),
            (Box::new(|s| s.load_balancing = 42), "load_balancing \"42\""),
            (Box::new(|s| s.name.clear()), "name is empty"),
        ];
        for (mutate, want) in cases {
            let mut s = base();
            mutate(&mut s);
            let err = Service::try_from(s).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }
}
