//! Egress through the waypoint: the `ExternalService`s bound to it (`ambit.dev/use-waypoint`).
//! ztunnel tunnels a pod's connection to one of them here, with what the pod dialled as the
//! `:authority` (a VIP the mesh allocated to a host, or one of the service's addresses);
//! the waypoint applies its L7 policy, then dials the real destination itself, outside the
//! mesh: plain TCP, or TLS when the port originates it.
//!
//! This module holds the service as received and compiles each port's TLS settings once per
//! state; [`crate::state`] (above it) works out where a connection goes, as a pure function
//! of the service and the authority, as ztunnel does for the same service: a STATIC
//! endpoint (on its own port for the service port, if it names one), a host name resolved
//! when dialling (DNS), or the dialled address itself (NONE).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

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

    /// The TLS client settings of port `number`, when it originates TLS.
    pub fn tls(&self, number: u16) -> Option<&Arc<rustls::ClientConfig>> {
        self.tls.get(&number)
    }
}

/// HTTP/2 to the instances of a port of this protocol, else HTTP/1.1.
pub fn is_h2(protocol: &str) -> bool {
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
