//! Egress through the waypoint: the `ExternalService`s bound to it (`ambit.dev/use-waypoint`).
//! ztunnel tunnels a pod's connection to one of them here, with what the pod dialled as the
//! `:authority` (a VIP the mesh allocated to a host, or one of the service's addresses);
//! the waypoint applies its L7 policy, then dials the real destination itself, outside the
//! mesh: plain TCP, or TLS when the port originates it.
//!
//! Where a connection goes is worked out here as a pure function of the service and the
//! authority, as ztunnel does for the same service: a STATIC endpoint (on its own port for
//! the service port, if it names one), a host name resolved when dialling (DNS), or the
//! dialled address itself (NONE). The TLS settings of each port are compiled once per state.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

use crate::state::{Direct, Originate, Peer, Upstream};

/// Why an external service does not compile.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// A port's TLS origination settings are unusable.
    #[error("external service {service}: port {port}: tls: {why}")]
    Tls {
        service: String,
        port: u16,
        why: String,
    },
}

/// How the real destination is found (Istio's resolutions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// The address the client dialled.
    #[default]
    None,
    /// One of the endpoints.
    Static,
    /// A host name, resolved when dialling.
    Dns,
}

/// TLS the waypoint opens to the instances of one port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExternalTls {
    /// Server name sent and verified; empty: the host the client asked for.
    pub sni: String,
    /// PEM roots; empty: the web's public roots.
    pub ca_certificates: String,
}

/// One declared port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExternalPort {
    pub number: u16,
    pub name: String,
    /// HTTP, HTTPS, GRPC, HTTP2, TLS or TCP.
    pub protocol: String,
    /// 0: the same as `number`.
    pub target_port: u16,
    pub tls: Option<ExternalTls>,
}

/// One instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExternalEndpoint {
    /// An IP address, or a host name with resolution DNS.
    pub address: String,
    /// Instance ports by the service port's name.
    pub ports: BTreeMap<String, u16>,
}

/// A VIP the controller allocated to one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalVip {
    pub host: String,
    pub address: IpAddr,
}

/// An ExternalService bound to this waypoint, as received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExternalService {
    pub name: String,
    pub namespace: String,
    pub hosts: Vec<String>,
    pub addresses: Vec<IpNet>,
    pub ports: Vec<ExternalPort>,
    pub resolution: Resolution,
    pub endpoints: Vec<ExternalEndpoint>,
    pub vips: Vec<ExternalVip>,
}

impl ExternalService {
    /// `namespace/name`: the key policies bound to it (`targetRefs` kind ExternalService)
    /// and the request's runtime state use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// True when a connection to `dst` is this service's: one of its networks on a declared
    /// port, or one of its endpoints on a declared port or that endpoint's own port.
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
                        .any(|p| e.ports.get(&p.name) == Some(&port)))
        })
    }
}

/// An external service with each port's TLS client settings built.
#[derive(Debug)]
pub struct Compiled {
    pub service: ExternalService,
    key: String,
    /// By port number, for the ports that originate TLS.
    tls: BTreeMap<u16, Arc<rustls::ClientConfig>>,
}

impl Compiled {
    /// Builds the TLS settings of the ports that originate it.
    pub fn new(service: ExternalService) -> Result<Self, ExternalError> {
        let mut tls = BTreeMap::new();
        for p in &service.ports {
            if let Some(t) = &p.tls {
                let config =
                    client_config(t, is_h2(&p.protocol)).map_err(|why| ExternalError::Tls {
                        service: service.key(),
                        port: p.number,
                        why,
                    })?;
                tls.insert(p.number, Arc::new(config));
            }
        }
        Ok(Compiled {
            key: service.key(),
            service,
            tls,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where a connection dialled at `authority` goes, and the host it named (`vip_host`:
    /// the host of the VIP dialled, if it was one): the instances to try, in order. Empty
    /// when the port is not declared or nothing is declared to go to.
    pub fn upstreams(&self, authority: SocketAddr, vip_host: Option<&str>) -> Vec<Upstream> {
        let x = &self.service;
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
                let config = self.tls.get(&p.number)?.clone();
                let sni = match &p.tls {
                    Some(t) if !t.sni.is_empty() => t.sni.clone(),
                    _ => host.to_string(),
                };
                Some(Originate {
                    server_name: ServerName::try_from(sni).ok()?,
                    config,
                })
            });
            Peer::External(Arc::new(Direct {
                service: self.key.clone(),
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
}

fn is_h2(protocol: &str) -> bool {
    matches!(protocol, "HTTP2" | "GRPC")
}

/// A TLS client config for one port: its roots (the given PEM, else the web's), and ALPN
/// for the HTTP version spoken to the instances.
fn client_config(t: &ExternalTls, h2: bool) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::{pem::PemObject as _, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    if t.ca_certificates.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    } else {
        for (i, cert) in CertificateDer::pem_slice_iter(t.ca_certificates.as_bytes()).enumerate() {
            let cert = cert.map_err(|e| format!("caCertificates: not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("caCertificates: certificate {i}: {e}"))?;
        }
        if roots.is_empty() {
            return Err("caCertificates holds no certificate".into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Compiled {
        Compiled::new(serde_yaml::from_str(yaml).expect("fixture")).expect("compiles")
    }

    fn dests(ups: &[Upstream]) -> Vec<String> {
        ups.iter()
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
    fn where_each_resolution_goes() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let none = service(
            "{name: a, namespace: x, hosts: [a.example], addresses: [192.0.2.0/24], \
             ports: [{number: 80, name: http, targetPort: 8080}]}",
        );
        assert_eq!(
            dests(&none.upstreams(at("192.0.2.7:80"), None)),
            ["192.0.2.7:8080"]
        );
        assert!(none.upstreams(at("192.0.2.7:81"), None).is_empty());
        // NONE has nowhere to send a VIP.
        assert!(none
            .upstreams(at("240.240.0.1:80"), Some("a.example"))
            .is_empty());

        let fixed = service(
            "{name: s, namespace: x, hosts: [s.example], addresses: [203.0.113.1/32], \
             ports: [{number: 80, name: http}], resolution: STATIC, \
             endpoints: [{address: 198.51.100.7, ports: {http: 9090}}, {address: 198.51.100.8}]}",
        );
        assert_eq!(
            dests(&fixed.upstreams(at("203.0.113.1:80"), None)),
            ["198.51.100.7:9090", "198.51.100.8:80"]
        );
        // An endpoint dialled on its own port is that endpoint.
        assert_eq!(
            dests(&fixed.upstreams(at("198.51.100.7:9090"), None)),
            ["198.51.100.7:9090"]
        );

        let dns = service(
            "{name: d, namespace: x, hosts: [pay.example.com], \
             ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443, \
             tls: {caCertificates: ''}}], resolution: DNS}",
        );
        assert_eq!(
            dests(&dns.upstreams(at("240.240.0.9:80"), Some("pay.example.com"))),
            ["pay.example.com@0.0.0.0:443 tls=pay.example.com"]
        );
    }

    #[test]
    fn bad_roots_are_refused_naming_the_port() {
        let x: ExternalService = serde_yaml::from_str(
            "{name: b, namespace: x, hosts: [b.example], ports: [{number: 80, \
             tls: {caCertificates: 'no pem here'}}]}",
        )
        .expect("fixture");
        let err = Compiled::new(x).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "external service x/b: port 80: tls: caCertificates holds no certificate"
        );
    }
}
