//! Builders of protobuf resources for the state, policy and decision tests.

use std::net::IpAddr;

use ambit_proto::discovery as pb;

use super::{ip_to_bytes, State, Store};

/// The state of node `n1` after one full push of `workloads`.
pub fn node_state(workloads: Vec<pb::Workload>) -> std::sync::Arc<State> {
    let mut store = Store::new(Some("n1"));
    let push = pb::Push {
        full_state: true,
        version: 1,
        upserts: workloads
            .into_iter()
            .map(|w| pb::Resource {
                kind: Some(pb::resource::Kind::Workload(w)),
            })
            .collect(),
        ..pb::Push::default()
    };
    store.apply(push).expect("a fixture push applies");
    store.snapshot()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// An enrolled workload `ns/name` with service account `sa` on `node` at `addr`.
pub fn workload(ns: &str, name: &str, sa: &str, node: &str, addr: &str) -> pb::Workload {
    pb::Workload {
        uid: format!("{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        node: node.into(),
        addresses: vec![ip_to_bytes(ip(addr))],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

pub fn gateway(addr: &str, identity: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        address: ip_to_bytes(ip(addr)),
        hbone_port: 15008,
        identity: identity.into(),
    }
}

/// Service `ns/name` on `vip`, `port` -> `target`, endpoints by workload uid (all ready).
pub fn service(
    ns: &str,
    name: &str,
    vip: &str,
    port: u32,
    target: u32,
    eps: &[&str],
) -> pb::Service {
    pb::Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: format!("{name}.{ns}.svc.cluster.local"),
        vips: vec![ip_to_bytes(ip(vip))],
        ports: vec![pb::ServicePort {
            service_port: port,
            target_port: target,
            name: "tcp".into(),
            app_protocol: String::new(),
        }],
        endpoints: eps
            .iter()
            .map(|uid| pb::Endpoint {
                workload_uid: uid.to_string(),
                ports: Default::default(),
                ready: true,
            })
            .collect(),
        ..Default::default()
    }
}

pub fn exact(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        r#match: Some(pb::string_match::Match::Exact(s.into())),
    }
}

pub fn prefix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        r#match: Some(pb::string_match::Match::Prefix(s.into())),
    }
}

pub fn suffix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        r#match: Some(pb::string_match::Match::Suffix(s.into())),
    }
}

pub fn presence() -> pb::StringMatch {
    pb::StringMatch {
        r#match: Some(pb::string_match::Match::Presence(true)),
    }
}

pub fn block(cidr: &str) -> pb::IpBlock {
    let net: ipnet::IpNet = cidr.parse().expect("test CIDR");
    pb::IpBlock {
        address: ip_to_bytes(net.addr()),
        prefix_len: u32::from(net.prefix_len()),
    }
}

pub fn policy(
    ns: &str,
    name: &str,
    scope: pb::PolicyScope,
    action: pb::PolicyAction,
    rules: Vec<pb::Rule>,
) -> pb::Authorization {
    pb::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        rules,
        ..Default::default()
    }
}

pub fn res_w(w: pb::Workload) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Workload(w)),
    }
}

pub fn res_s(s: pb::Service) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Service(s)),
    }
}

pub fn res_a(a: pb::Authorization) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::Authorization(a)),
    }
}

/// A PeerAuthentication: selector labels and port-level modes may be empty.
pub fn peer_auth(
    ns: &str,
    name: &str,
    scope: pb::PolicyScope,
    mode: pb::MtlsMode,
    selector: &[(&str, &str)],
    ports: &[(u32, pb::MtlsMode)],
) -> pb::PeerAuthentication {
    pb::PeerAuthentication {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        selector: selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        mode: mode as i32,
        port_level_mtls: ports.iter().map(|&(p, m)| (p, m as i32)).collect(),
    }
}

pub fn res_pa(p: pb::PeerAuthentication) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::PeerAuthentication(p)),
    }
}

pub fn full(version: u64, upserts: Vec<pb::Resource>) -> pb::Push {
    pb::Push {
        nonce: format!("n{version}"),
        full_state: true,
        version,
        upserts,
        removals: vec![],
        trust_roots: vec![],
    }
}

pub fn delta(
    version: u64,
    upserts: Vec<pb::Resource>,
    removals: Vec<(pb::ResourceKind, &str)>,
) -> pb::Push {
    pb::Push {
        nonce: format!("n{version}"),
        full_state: false,
        version,
        upserts,
        removals: removals
            .into_iter()
            .map(|(k, n)| pb::ResourceKey {
                kind: k as i32,
                name: n.into(),
            })
            .collect(),
        trust_roots: vec![],
    }
}
