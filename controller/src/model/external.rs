//! Conversion of `ExternalService` to its wire form for ztunnels, and the namespaces'
//! outbound policy label.
//!
//! Every field is checked by [`ExternalServiceSpec::check`](crate::crd::external::ExternalServiceSpec::check),
//! by the local source before the object is taken (file, document, field) and here for the
//! Kubernetes source, so a ztunnel never receives one it would have to refuse.

use std::collections::BTreeMap;

use ambit_proto::discovery::{
    ExternalEndpoint, ExternalPort, ExternalResolution, ExternalService as Wire, ExternalTls,
    IpBlock, OutboundPolicy,
};

use super::{ip_bytes, typed, FieldError, Kind, ModelError, Store};
use crate::crd::external::{ExternalServiceSpec, Resolution};
use crate::crd::peer_auth::InvalidField;

/// Namespace label choosing what its workloads may reach outside the mesh: `ALLOW_ANY`
/// (the default) or `REGISTRY_ONLY` (mesh destinations and ExternalServices only).
pub const OUTBOUND_POLICY_LABEL: &str = "ambit.dev/outbound-policy";

/// The outbound policy a namespace's labels set, or why the label is wrong.
pub fn outbound_policy(
    labels: Option<&BTreeMap<String, String>>,
) -> Result<OutboundPolicy, InvalidField> {
    match labels
        .and_then(|l| l.get(OUTBOUND_POLICY_LABEL))
        .map(String::as_str)
    {
        None | Some("ALLOW_ANY") => Ok(OutboundPolicy::AllowAny),
        Some("REGISTRY_ONLY") => Ok(OutboundPolicy::RegistryOnly),
        Some(other) => Err(InvalidField {
            field: format!("metadata.labels[{OUTBOUND_POLICY_LABEL}]"),
            why: format!("{other:?} is not ALLOW_ANY or REGISTRY_ONLY"),
        }),
    }
}

/// Converts one spec, or names the field that is wrong.
pub(super) fn convert(
    spec: &ExternalServiceSpec,
    namespace: &str,
    name: &str,
) -> Result<Wire, (String, FieldError)> {
    let checked = spec
        .check()
        .map_err(|e| (e.field, FieldError::Invalid(e.why)))?;
    Ok(Wire {
        name: name.into(),
        namespace: namespace.into(),
        hosts: spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        addresses: checked
            .addresses
            .iter()
            .map(|n| IpBlock {
                address: ip_bytes(n.addr()),
                prefix_len: u32::from(n.prefix_len()),
            })
            .collect(),
        // `check` bounded the numbers to 1-65535.
        ports: spec
            .ports
            .iter()
            .map(|p| ExternalPort {
                number: p.number,
                name: p.name.clone(),
                protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase(),
                target_port: p.target_port.unwrap_or(0),
                tls: p.tls.as_ref().map(|t| ExternalTls {
                    sni: t.sni.clone().unwrap_or_default().to_ascii_lowercase(),
                    ca_certificates: t.ca_certificates.clone().unwrap_or_default(),
                }),
            })
            .collect(),
        resolution: match spec.resolution {
            Resolution::None => ExternalResolution::None,
            Resolution::Static => ExternalResolution::Static,
            Resolution::Dns => ExternalResolution::Dns,
        } as i32,
        endpoints: spec
            .endpoints
            .iter()
            .map(|e| ExternalEndpoint {
                address: e.address.clone(),
                ports: e.ports.clone().into_iter().collect(),
            })
            .collect(),
        // Allocated over every service at once, by `allocate_vips`.
        vips: Vec::new(),
        // Resolved with the other objects' waypoints, by the caller.
        waypoint: None,
    })
}

/// Converts every `ExternalService`, each with its labels (which may bind it to a
/// waypoint); invalid ones are reported and left out (a source that reads files refuses
/// them earlier, keeping the file's last good objects).
pub(super) fn external_services<'a>(
    store: &'a Store,
    errors: &mut Vec<ModelError>,
) -> Vec<(Wire, Option<&'a BTreeMap<String, String>>)> {
    let mut out = Vec::new();
    let mut labels = Vec::new();
    for x in typed!(store, ExternalService) {
        let Some(name) = x.metadata.name.clone() else {
            continue;
        };
        let namespace = x
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| super::DEFAULT_NAMESPACE.into());
        match convert(&x.spec, &namespace, &name) {
            Ok(w) => {
                out.push(w);
                labels.push(x.metadata.labels.as_ref());
            }
            Err((field, reason)) => errors.push(ModelError::Rejected {
                kind: Kind::ExternalService,
                namespace,
                name,
                field,
                reason,
            }),
        }
    }
    allocate_vips(&mut out);
    out.into_iter().zip(labels).collect()
}

/// The network external hosts' IPv4 VIPs come from (reserved for future use by RFC 1112,
/// so never a real destination).
pub const VIP_NET_V4: [u8; 2] = [240, 240];
/// The IPv6 counterpart (a /112 of the unique-local range): the same offset as the IPv4 VIP.
pub const VIP_NET_V6: [u16; 6] = [0xfd00, 0x240, 0x240, 0, 0, 0];

/// FNV-1a: a stable hash (the same in every controller build and replica), so a host keeps
/// its VIP across restarts and leader changes.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Gives every host without a wildcard one IPv4 and one IPv6 VIP, the same for the same
/// host in every service. A host's offset in the /16 is its hash; a collision takes the next
/// free offset, hosts taken in name order, so a VIP only moves when a host hashing to the
/// same offset appears before it (about 1 in 65534 per pair).
pub(super) fn allocate_vips(services: &mut [Wire]) {
    use ambit_proto::discovery::ExternalVip;
    use std::collections::{BTreeSet, HashMap};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let hosts: BTreeSet<String> = services
        .iter()
        .flat_map(|x| x.hosts.iter())
        .filter(|h| !h.starts_with('*'))
        .cloned()
        .collect();
    let mut taken: BTreeSet<u16> = BTreeSet::new();
    let mut offsets: HashMap<String, u16> = HashMap::new();
    for host in hosts {
        // Offsets 1..=65534: not the network's first or last address.
        let mut off = (fnv1a(&host) % 65534) as u16 + 1;
        while taken.contains(&off) {
            off = if off == 65534 { 1 } else { off + 1 };
        }
        taken.insert(off);
        offsets.insert(host, off);
    }
    for x in services {
        x.vips = x
            .hosts
            .iter()
            .filter_map(|h| Some((h, *offsets.get(h)?)))
            .flat_map(|(h, off)| {
                let [hi, lo] = off.to_be_bytes();
                let v4 = Ipv4Addr::new(VIP_NET_V4[0], VIP_NET_V4[1], hi, lo);
                let [a, b, c, d, e, f] = VIP_NET_V6;
                let v6 = Ipv6Addr::new(a, b, c, d, e, f, 0, off);
                [IpAddr::V4(v4), IpAddr::V6(v6)].map(|ip| ExternalVip {
                    host: h.clone(),
                    address: ip_bytes(ip),
                })
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(name: &str, hosts: &[&str]) -> Wire {
        Wire {
            name: name.into(),
            namespace: "ns".into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn vips_are_stable_per_host_and_distinct() {
        let mut a = vec![
            wire("a", &["x.example.com", "*.wild.example"]),
            wire("b", &["x.example.com", "y.example.com"]),
        ];
        allocate_vips(&mut a);
        // The same host gets the same VIP in every service; a wildcard gets none.
        assert_eq!(a[0].vips.len(), 2);
        assert_eq!(a[0].vips[..2], a[1].vips[..2]);
        assert_ne!(a[1].vips[0].address, a[1].vips[2].address);
        // Another set of services leaves an unrelated host's VIP where it was.
        let mut b = vec![wire("c", &["x.example.com"])];
        allocate_vips(&mut b);
        assert_eq!(b[0].vips, a[0].vips);
        // Colliding offsets are probed to the next free one.
        let many: Vec<Wire> = (0..3000)
            .map(|i| wire(&format!("s{i}"), &[&format!("h{i}.example")]))
            .collect();
        let mut many = many;
        allocate_vips(&mut many);
        let distinct: std::collections::BTreeSet<&Vec<u8>> =
            many.iter().map(|x| &x.vips[0].address).collect();
        assert_eq!(distinct.len(), 3000);
    }
}
