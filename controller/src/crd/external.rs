//! `ExternalService` in `networking.ambit.dev/v1`: a destination outside the mesh declared to
//! it, with the fields of Istio's `ServiceEntry` where they mean the same (`hosts`,
//! `addresses`, `ports`, `resolution`, `endpoints`), so operators can bring the entries they
//! already have (`location` is left out: every ExternalService is outside the mesh).
//!
//! Enums are typed (a misspelt resolution is refused where the document is read, naming the
//! field); [`ExternalServiceSpec::check`] holds the rules the types cannot: host names, IP
//! addresses and CIDRs, ports 1-65535 and unique, endpoints that fit the resolution. Every
//! source and `ambitctl apply` run that check, so a bad object is refused with its file,
//! document and field.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::peer_auth::InvalidField;

/// A destination outside the mesh that its workloads may reach, even under a namespace's
/// `REGISTRY_ONLY` outbound policy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.ambit.dev",
    version = "v1",
    kind = "ExternalService",
    plural = "externalservices",
    shortname = "xs",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalServiceSpec {
    /// DNS names of the service (e.g. `api.example.com`); at least one. A leading `*.`
    /// wildcard is allowed except with `resolution: DNS` (there is no name to resolve).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// IP addresses or CIDRs the service answers on; a connection to one of them on a
    /// declared port is the service's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The ports the service listens on; at least one.
    #[serde(default)]
    pub ports: Vec<ExternalPort>,
    /// How the real destination is found: `NONE` (the address the client dialled),
    /// `STATIC` (the `endpoints`), `DNS` (the hosts, or the endpoints' addresses, resolved).
    #[serde(default)]
    pub resolution: Resolution,
    /// Where the service's instances are: IP addresses for `STATIC`, IPs or host names for
    /// `DNS`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ExternalEndpoint>,
}

/// One port of an external service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPort {
    /// The port number clients dial, 1-65535.
    pub number: u32,
    /// A name, unique in the service.
    #[serde(default)]
    pub name: String,
    /// `HTTP`, `HTTPS`, `GRPC`, `HTTP2`, `TLS` or `TCP` (the default, as Istio reads an
    /// unknown protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The port the instances listen on, when it differs from `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
    /// TLS origination: the waypoint the service is bound to (`ambit.dev/use-waypoint`)
    /// opens TLS to the instances on this port, so the client speaks plain HTTP to the mesh
    /// (which applies L7 policy to it) and the destination still gets HTTPS. Not in Istio's
    /// ServiceEntry (Istio puts it in a DestinationRule); it needs a waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ExternalTls>,
}

/// How a waypoint originates TLS to an external service's port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalTls {
    /// The server name sent (SNI) and verified in the destination's certificate; by default
    /// the host the client asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM certificates that verify the destination; by default the web's public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
}

/// Istio's resolutions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Resolution {
    /// The connection goes to the address the client dialled.
    #[default]
    None,
    /// The connection goes to one of the `endpoints`.
    Static,
    /// The connection goes to an address the host name resolves to.
    Dns,
}

/// One instance of an external service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalEndpoint {
    /// An IP address (or, with `resolution: DNS`, a host name).
    pub address: String,
    /// Instance ports by the service port's name, when they differ from the service's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
}

/// Port protocols the service's `ports` may name, as Istio spells them.
pub const PROTOCOLS: [&str; 6] = ["HTTP", "HTTPS", "GRPC", "HTTP2", "TLS", "TCP"];

/// An external service's spec, with every field parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The `addresses`, as networks (a plain address is a /32 or /128).
    pub addresses: Vec<IpNet>,
    /// The `endpoints` whose address is an IP.
    pub endpoint_ips: Vec<IpAddr>,
}

fn invalid(field: String, why: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        why: why.into(),
    }
}

/// True when `host` is a DNS name as RFC 1123 writes one (labels of letters, digits and
/// inner hyphens, 63 characters at most, 253 in all), optionally with a `*.` prefix when
/// `wildcard`.
pub fn valid_host(host: &str, wildcard: bool) -> bool {
    let name = match host.strip_prefix("*.") {
        Some(rest) if wildcard => rest,
        _ => host,
    };
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn port_number(n: u32, field: String) -> Result<u16, InvalidField> {
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(
            field,
            format!("{n} is not a port number (1-65535)"),
        )),
    }
}

/// An origination setting's server name is a DNS name and its roots are PEM certificates.
fn check_tls(tls: &ExternalTls, at: &str) -> Result<(), InvalidField> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    if let Some(sni) = &tls.sni {
        if !valid_host(sni, false) {
            return Err(invalid(
                format!("{at}.sni"),
                format!("{sni:?} is not a DNS name"),
            ));
        }
    }
    if let Some(pem) = &tls.ca_certificates {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("{at}.caCertificates"), format!("not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(invalid(
                format!("{at}.caCertificates"),
                "holds no PEM CERTIFICATE block",
            ));
        }
        for (i, der) in certs.iter().enumerate() {
            webpki::anchor_from_trusted_cert(der).map_err(|e| {
                invalid(
                    format!("{at}.caCertificates"),
                    format!("certificate {i} is not a usable root: {e}"),
                )
            })?;
        }
    }
    Ok(())
}

impl ExternalServiceSpec {
    /// The spec's parsed addresses, or the first field that is wrong.
    pub fn check(&self) -> Result<Checked, InvalidField> {
        if self.hosts.is_empty() {
            return Err(invalid("spec.hosts".into(), "must list at least one host"));
        }
        let mut hosts = BTreeSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            if !valid_host(h, self.resolution != Resolution::Dns) {
                let why = if h.starts_with("*.") {
                    "a wildcard host cannot be resolved: use resolution NONE or STATIC".into()
                } else {
                    format!("{h:?} is not a DNS name (letters, digits, '-' and '.')")
                };
                return Err(invalid(field, why));
            }
            if !hosts.insert(h.to_ascii_lowercase()) {
                return Err(invalid(field, format!("{h:?} is listed twice")));
            }
        }
        let mut addresses = Vec::new();
        for (i, a) in self.addresses.iter().enumerate() {
            let net = a
                .parse::<IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(
                        format!("spec.addresses[{i}]"),
                        format!("{a:?} is not an IP address or CIDR"),
                    )
                })?;
            addresses.push(net.trunc());
        }
        if self.ports.is_empty() {
            return Err(invalid("spec.ports".into(), "must list at least one port"));
        }
        let (mut numbers, mut names) = (BTreeSet::new(), BTreeSet::new());
        for (i, p) in self.ports.iter().enumerate() {
            let at = |f: &str| format!("spec.ports[{i}].{f}");
            let n = port_number(p.number, at("number"))?;
            if !numbers.insert(n) {
                return Err(invalid(at("number"), format!("port {n} is listed twice")));
            }
            if !p.name.is_empty() && !names.insert(p.name.as_str()) {
                return Err(invalid(at("name"), format!("{:?} is listed twice", p.name)));
            }
            if let Some(proto) = &p.protocol {
                if !PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str()) {
                    return Err(invalid(
                        at("protocol"),
                        format!("{proto:?} is not one of {}", PROTOCOLS.join(", ")),
                    ));
                }
            }
            if let Some(t) = p.target_port {
                port_number(t, at("targetPort"))?;
            }
            if let Some(tls) = &p.tls {
                check_tls(tls, &at("tls"))?;
            }
        }
        let mut endpoint_ips = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let at = |f: &str| format!("spec.endpoints[{i}].{f}");
            match (e.address.parse::<IpAddr>(), self.resolution) {
                (Ok(ip), _) => endpoint_ips.push(ip),
                (Err(_), Resolution::Dns) if valid_host(&e.address, false) => {}
                (Err(_), Resolution::Dns) => {
                    return Err(invalid(
                        at("address"),
                        format!("{:?} is not an IP address or a DNS name", e.address),
                    ))
                }
                (Err(_), _) => {
                    return Err(invalid(
                        at("address"),
                        format!(
                            "{:?} is not an IP address (host names need resolution DNS)",
                            e.address
                        ),
                    ))
                }
            }
            for (name, n) in &e.ports {
                let field = at(&format!("ports[{name}]"));
                if !names.contains(name.as_str()) {
                    return Err(invalid(field, "names no port of spec.ports"));
                }
                port_number(*n, field)?;
            }
        }
        match self.resolution {
            Resolution::Static if self.endpoints.is_empty() => Err(invalid(
                "spec.endpoints".into(),
                "resolution STATIC needs at least one endpoint",
            )),
            Resolution::None if !self.endpoints.is_empty() => Err(invalid(
                "spec.endpoints".into(),
                "endpoints need resolution STATIC or DNS",
            )),
            _ => Ok(Checked {
                addresses,
                endpoint_ips,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ExternalServiceSpec {
        serde_yaml::from_str(yaml).expect("fixture")
    }

    #[test]
    fn good_specs_pass_and_bad_fields_are_named() {
        let ok = spec(
            "{hosts: [api.example.com], addresses: [192.0.2.0/24, 198.51.100.7], \
             ports: [{number: 443, name: https, protocol: HTTPS}], resolution: NONE}",
        );
        let checked = ok.check().expect("valid");
        assert_eq!(checked.addresses.len(), 2);
        assert!(spec(
            "{hosts: [db.example.com], ports: [{number: 5432, name: pg}], resolution: STATIC, \
             endpoints: [{address: 192.0.2.9, ports: {pg: 6432}}]}"
        )
        .check()
        .is_ok());
        let cases = [
            ("{hosts: [], ports: [{number: 80}]}", "spec.hosts"),
            (
                "{hosts: [bad_host!], ports: [{number: 80}]}",
                "spec.hosts[0]",
            ),
            (
                "{hosts: ['*.example.com'], ports: [{number: 80}], resolution: DNS}",
                "spec.hosts[0]",
            ),
            ("{hosts: [a.b], ports: [{number: 70000}]}", "spec.ports[0].number"),
            ("{hosts: [a.b], ports: [{number: 0}]}", "spec.ports[0].number"),
            ("{hosts: [a.b], ports: []}", "spec.ports"),
            (
                "{hosts: [a.b], ports: [{number: 80}, {number: 80}]}",
                "spec.ports[1].number",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80, protocol: SMTP}]}",
                "spec.ports[0].protocol",
            ),
            (
                "{hosts: [a.b], addresses: [10.0.0.0/33], ports: [{number: 80}]}",
                "spec.addresses[0]",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80}], resolution: STATIC}",
                "spec.endpoints",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80}], resolution: STATIC, endpoints: [{address: x.y}]}",
                "spec.endpoints[0].address",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80, name: h}], resolution: STATIC, endpoints: [{address: 10.0.0.1, ports: {h: 99999}}]}",
                "spec.endpoints[0].ports[h]",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80, tls: {sni: 'not a host'}}]}",
                "spec.ports[0].tls.sni",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80, tls: {caCertificates: 'hello'}}]}",
                "spec.ports[0].tls.caCertificates",
            ),
            (
                "{hosts: [a.b], ports: [{number: 80, tls: {caCertificates: \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\"}}]}",
                "spec.ports[0].tls.caCertificates",
            ),
        ];
        for (yaml, field) in cases {
            let err = spec(yaml).check().expect_err(yaml);
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
    }
}
