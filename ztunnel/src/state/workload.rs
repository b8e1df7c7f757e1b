//! Workloads (pods, and waypoints themselves) as ztunnel sees them.
//!
//! A workload is what a connection starts from or ends at: an address, an identity to
//! present or expect, and whether it is in the mesh (reached over HBONE) or not (plain TCP).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ambit_hbone::identity::{Identity, DEFAULT_TRUST_DOMAIN};
use ambit_proto::discovery as pb;
use serde::{Deserialize, Serialize};

use super::{ip_from_bytes, ConvertError};

pub use super::gateway::{GatewayAddress, HBONE_PORT};

/// How a workload is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TunnelProtocol {
    /// Not in the mesh (namespace not enrolled, or the pod opted out): plain TCP.
    Tcp,
    /// Enrolled: traffic to it travels in an HBONE tunnel and its ztunnel enforces policy.
    Hbone,
}

/// A pod (or a waypoint's pod): the unit of identity and of policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Stable key (the pod's uid); what services' endpoints refer to.
    pub uid: Arc<str>,
    /// Pod name.
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`: what its certificate
    /// carries, what peers expect of it.
    pub identity: Identity,
    /// Kubernetes node the pod runs on (which ztunnel serves it).
    pub node: Arc<str>,
    /// Pod IPs, IPv4 and/or IPv6.
    pub addresses: Vec<IpAddr>,
    pub protocol: TunnelProtocol,
    /// Waypoint that inbound traffic for this workload must traverse.
    pub waypoint: Option<GatewayAddress>,
    /// "namespace/name" of the policies selecting this workload by labels.
    pub authorization_policies: Vec<Arc<str>>,
    pub labels: BTreeMap<Arc<str>, Arc<str>>,
    /// Owning workload ("reviews-v1") for metrics; the pod name when it has no owner.
    pub workload_name: Arc<str>,
    pub canonical_name: Arc<str>,
    pub canonical_revision: Arc<str>,
    /// Topology zone, for locality-aware endpoint choice; `None` when unknown.
    pub zone: Option<Arc<str>>,
    /// This workload is a waypoint proxy.
    pub is_waypoint: bool,
    /// What it may reach outside the mesh (absent from older config dumps: ALLOW_ANY).
    #[serde(default)]
    pub outbound_policy: super::OutboundPolicy,
}

impl Workload {
    /// "namespace/name (uid ...)": how logs and errors name a workload.
    pub fn describe(&self) -> String {
        format!("{}/{} (uid {})", self.namespace, self.name, self.uid)
    }

    /// The workload's address in the same family as `like`, or its first one.
    pub fn address_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .or_else(|| self.addresses.first().copied())
    }

    /// True when `ip` is one of this workload's addresses.
    pub fn has_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.addresses.contains(&ip)
    }
}

impl TryFrom<pb::Workload> for Workload {
    type Error = ConvertError;

    fn try_from(w: pb::Workload) -> Result<Self, Self::Error> {
        let resource = || format!("workload {}/{} (uid {})", w.namespace, w.name, w.uid);
        let missing = |field| ConvertError::Missing {
            resource: resource(),
            field,
        };
        if w.uid.is_empty() {
            return Err(missing("uid"));
        }
        if w.name.is_empty() {
            return Err(missing("name"));
        }
        if w.namespace.is_empty() {
            return Err(missing("namespace"));
        }
        // Kubernetes gives every pod a service account; "default" when the spec names none.
        let service_account = if w.service_account.is_empty() {
            "default"
        } else {
            &w.service_account
        };
        let trust_domain = if w.trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            &w.trust_domain
        };
        let identity = Identity::new(trust_domain, &w.namespace, service_account).map_err(|e| {
            ConvertError::Invalid {
                resource: resource(),
                field: "identity (trust_domain, namespace, service_account)".into(),
                value: format!("{trust_domain}/{}/{service_account}", w.namespace),
                why: e.to_string(),
            }
        })?;
        let mut addresses = Vec::with_capacity(w.addresses.len());
        for (i, raw) in w.addresses.iter().enumerate() {
            let ip = ip_from_bytes(&resource, &|| format!("address {i}"), raw)?;
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::None) => TunnelProtocol::Tcp,
            Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
            Err(_) => {
                return Err(ConvertError::Invalid {
                    resource: resource(),
                    field: "tunnel_protocol".into(),
                    value: w.tunnel_protocol.to_string(),
                    why: "unknown protocol".into(),
                })
            }
        };
        let waypoint = match w.waypoint.clone() {
            Some(gw) => Some(GatewayAddress::from_proto(&resource, "waypoint", gw)?),
            None => None,
        };
        for (i, p) in w.authorization_policies.iter().enumerate() {
            if p.split_once('/')
                .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
            {
                return Err(ConvertError::Invalid {
                    resource: resource(),
                    field: format!("authorization_policies[{i}]"),
                    value: p.clone(),
                    why: "expected \"namespace/name\"".into(),
                });
            }
        }
        let name: Arc<str> = w.name.as_str().into();
        let workload_name: Arc<str> = if w.workload_name.is_empty() {
            name.clone()
        } else {
            w.workload_name.as_str().into()
        };
        let canonical_name = if w.canonical_name.is_empty() {
            workload_name.clone()
        } else {
            w.canonical_name.as_str().into()
        };
        let canonical_revision = if w.canonical_revision.is_empty() {
            "latest".into()
        } else {
            w.canonical_revision.as_str().into()
        };
        Ok(Workload {
            uid: w.uid.as_str().into(),
            name,
            namespace: w.namespace.as_str().into(),
            service_account: service_account.into(),
            identity,
            node: w.node.as_str().into(),
            addresses,
            protocol,
            waypoint,
            authorization_policies: w
                .authorization_policies
                .iter()
                .map(|p| p.as_str().into())
                .collect(),
            labels: w
                .labels
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            workload_name,
            canonical_name,
            canonical_revision,
            zone: (!w.zone.is_empty()).then(|| w.zone.as_str().into()),
            is_waypoint: w.is_waypoint,
            outbound_policy: match pb::OutboundPolicy::try_from(w.outbound_policy) {
                Ok(pb::OutboundPolicy::AllowAny) => super::OutboundPolicy::AllowAny,
                Ok(pb::OutboundPolicy::RegistryOnly) => super::OutboundPolicy::RegistryOnly,
                Err(_) => {
                    return Err(ConvertError::Invalid {
                        resource: resource(),
                        field: "outbound_policy".into(),
                        value: w.outbound_policy.to_string(),
                        why: "not ALLOW_ANY or REGISTRY_ONLY".into(),
                    })
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Mutate = Box<dyn Fn(&mut pb::Workload)>;

    fn base() -> pb::Workload {
        pb::Workload {
            uid: "u1".into(),
            name: "web-0".into(),
            namespace: "default".into(),
            service_account: "web".into(),
            node: "node-1".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            ..Default::default()
        }
    }

    #[test]
    fn converts_with_defaults() {
        let w = Workload::try_from(base()).unwrap();
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(w.addresses, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.protocol, TunnelProtocol::Hbone);
        assert_eq!(&*w.workload_name, "web-0");
        assert_eq!(&*w.canonical_revision, "latest");
        assert_eq!(w.zone, None);
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        let cases: Vec<(Mutate, &str)> = vec![
            (
                Box::new(|w| w.addresses.push(vec![1, 2, 3, 4, 5])),
                "workload default/web-0 (uid u1): address 1 is 5 bytes, not an IPv4 or IPv6 address",
            ),
            (Box::new(|w| w.uid.clear()), "uid is empty"),
            (Box::new(|w| w.tunnel_protocol = 7), "tunnel_protocol \"7\""),
            (Box::new(|w| w.service_account = "Bad_SA".into()), "identity"),
            (
                Box::new(|w| {
                    w.waypoint = Some(pb::GatewayAddress {
                        address: vec![10, 0, 0, 9],
                        hbone_port: 15008,
                        identity: "nope".into(),
                    })
                }),
                "waypoint.identity \"nope\"",
            ),
            (
                Box::new(|w| {
                    w.waypoint = Some(pb::GatewayAddress {
                        address: vec![10, 0, 0, 9],
                        hbone_port: 70000,
                        identity: "spiffe://cluster.local/ns/a/sa/wp".into(),
                    })
                }),
                "waypoint.hbone_port \"70000\"",
            ),
            (
                Box::new(|w| w.authorization_policies.push("noslash".into())),
                "authorization_policies[0]",
            ),
        ];
        for (mutate, want) in cases {
            let mut w = base();
            mutate(&mut w);
            let err = Workload::try_from(w).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let mut w = base();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let IpAddr::V6(v6b) = v6 else { unreachable!() };
        w.addresses = vec![
            v6b.octets().to_vec(),
            std::net::Ipv4Addr::new(10, 0, 0, 1)
                .to_ipv6_mapped()
                .octets()
                .to_vec(),
        ];
        let w = Workload::try_from(w).unwrap();
        assert_eq!(w.addresses[0], v6);
        assert_eq!(w.addresses[1], "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            w.address_like("1.1.1.1".parse().unwrap()),
            Some(w.addresses[1])
        );
    }
}
