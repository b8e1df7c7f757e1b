//! Discovery pushes as the proxies receive them: protobuf bytes decoded, converted to
//! domain types at the edge (`TryFrom`) and applied, by ztunnel's store and by the
//! waypoint's resources.
//!
//! Seeds are the controller's own pushes for the corpus mesh (`corpus/controller/`) and the
//! static state example; inputs are those pushes with fields set to values near their edges
//! (address lengths, ports past 65535, unknown enum numbers, malformed identities), or their
//! encoded bytes mutated.
//!
//! Properties: nothing panics; a refused push leaves the last good state exactly in place;
//! an accepted one has consistent indexes (every address and VIP finds its owner), dumps as
//! JSON (the admin config dump), and is accepted again when repeated.

use std::path::Path;
use std::sync::Arc;

use ambit_proto::discovery as pb;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;

use crate::mutate;

/// The pushes the fuzzer starts from (built once).
pub(crate) fn seed_pushes() -> &'static [pb::Push] {
    static SEEDS: std::sync::OnceLock<Vec<pb::Push>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(build_seeds)
}

fn build_seeds() -> Vec<pb::Push> {
    use ambit_controller::model::{derive, ModelConfig, Store};
    let yaml = include_str!("../../corpus/controller/mesh.yaml");
    let objects = ambit_controller::source::local::parse_file(Path::new("mesh.yaml"), yaml)
        .unwrap_or_else(|e| panic!("corpus mesh: {e:?}"));
    let store = Store::from_objects(objects.into_iter().map(|l| l.object));
    let derived = derive(&store, &ModelConfig::default());
    let upserts: Vec<pb::Resource> = derived
        .resources
        .values()
        .map(|r| r.resource.clone())
        .collect();
    let full = pb::Push {
        nonce: "1".into(),
        full_state: true,
        version: 1,
        upserts: upserts.clone(),
        removals: Vec::new(),
        trust_roots: vec!["-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into()],
    };
    let removals = derived
        .resources
        .keys()
        .take(3)
        .map(|k| k.to_proto())
        .collect();
    let delta = pb::Push {
        nonce: "2".into(),
        full_state: false,
        version: 2,
        upserts: upserts.into_iter().skip(3).take(3).collect(),
        removals,
        trust_roots: Vec::new(),
    };
    let example = ambit_ztunnel::state::static_file::parse(
        "example",
        include_str!("../../corpus/static-state/example.yaml"),
        3,
    )
    .unwrap_or_else(|e| panic!("corpus static state: {e}"));
    vec![full, delta, example]
}

/// A change to one field of a push, to a value near the edge of what it may hold.
#[derive(Clone, Debug)]
enum FieldEdit {
    Address(Index, Vec<u8>),
    Port(Index, u32),
    Enum(Index, i32),
    Text(Index, String),
    Prefix(Index, u32),
    DropResource(Index),
    CopyResource(Index),
    FlipFullState,
}

fn edge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(15008),
        Just(65535),
        Just(65536),
        Just(u32::MAX),
        any::<u32>()
    ]
}

fn edge_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/".to_string()),
        Just("a/".to_string()),
        Just("*".to_string()),
        Just("spiffe://cluster.local/ns/a/sa/b".to_string()),
        Just("spiffe://cluster.local/ns//sa/b".to_string()),
        Just("spiffe:///ns/a/sa/b".to_string()),
        Just("{\"rules\": [{}]}".to_string()),
        Just(
            "{\"rules\": [{\"backendRefs\": [{\"name\": \"x\", \"weight\": 4294967295}]}]}"
                .to_string()
        ),
        Just("[".repeat(200)),
        "[a-z/.*:{}\\[\\]\"0-9-]{0,24}",
        any::<String>(),
    ]
}

fn field_edit() -> impl Strategy<Value = FieldEdit> {
    let address = prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 4),
        prop::collection::vec(any::<u8>(), 16),
        prop::collection::vec(any::<u8>(), 0..20),
    ];
    prop_oneof![
        1 => (any::<Index>(), address).prop_map(|(i, a)| FieldEdit::Address(i, a)),
        1 => (any::<Index>(), edge_u32()).prop_map(|(i, p)| FieldEdit::Port(i, p)),
        1 => (any::<Index>(), prop_oneof![Just(-1i32), Just(3), Just(99), any::<i32>()])
            .prop_map(|(i, e)| FieldEdit::Enum(i, e)),
        3 => (any::<Index>(), edge_text()).prop_map(|(i, t)| FieldEdit::Text(i, t)),
        1 => (any::<Index>(), prop_oneof![Just(0u32), Just(32), Just(33), Just(128), Just(129), any::<u32>()])
            .prop_map(|(i, p)| FieldEdit::Prefix(i, p)),
        1 => (any::<Index>()).prop_map(FieldEdit::DropResource),
        1 => (any::<Index>()).prop_map(FieldEdit::CopyResource),
        1 => Just(FieldEdit::FlipFullState),
    ]
}

/// Mutable references to every field of one kind in a push, so an edit can pick one.
#[derive(Default)]
struct Fields<'a> {
    addresses: Vec<&'a mut Vec<u8>>,
    ports: Vec<&'a mut u32>,
    enums: Vec<&'a mut i32>,
    texts: Vec<&'a mut String>,
    prefixes: Vec<&'a mut u32>,
}

fn string_match<'a>(m: &'a mut pb::StringMatch, f: &mut Fields<'a>) {
    use pb::string_match::Match;
    if let Some(Match::Exact(s) | Match::Prefix(s) | Match::Suffix(s)) = &mut m.r#match {
        f.texts.push(s);
    }
}

fn ip_block<'a>(b: &'a mut pb::IpBlock, f: &mut Fields<'a>) {
    f.addresses.push(&mut b.address);
    f.prefixes.push(&mut b.prefix_len);
}

fn gateway<'a>(g: &'a mut Option<pb::GatewayAddress>, f: &mut Fields<'a>) {
    if let Some(g) = g {
        f.addresses.push(&mut g.address);
        f.ports.push(&mut g.hbone_port);
        f.texts.push(&mut g.identity);
    }
}

fn fields(push: &mut pb::Push) -> Fields<'_> {
    use pb::resource::Kind;
    let mut f = Fields::default();
    for k in &mut push.removals {
        f.enums.push(&mut k.kind);
        f.texts.push(&mut k.name);
    }
    for r in &mut push.upserts {
        match &mut r.kind {
            Some(Kind::Workload(w)) => {
                f.texts.extend([
                    &mut w.uid,
                    &mut w.name,
                    &mut w.namespace,
                    &mut w.service_account,
                    &mut w.trust_domain,
                    &mut w.node,
                ]);
                f.texts.extend(w.authorization_policies.iter_mut());
                f.addresses.extend(w.addresses.iter_mut());
                f.enums.push(&mut w.tunnel_protocol);
                gateway(&mut w.waypoint, &mut f);
            }
            Some(Kind::Service(s)) => {
                f.texts
                    .extend([&mut s.name, &mut s.namespace, &mut s.hostname]);
                f.addresses.extend(s.vips.iter_mut());
                for p in &mut s.ports {
                    f.ports.extend([&mut p.service_port, &mut p.target_port]);
                    f.texts.push(&mut p.app_protocol);
                }
                for e in &mut s.endpoints {
                    f.texts.push(&mut e.workload_uid);
                    f.ports.extend(e.ports.values_mut());
                }
                f.enums.push(&mut s.load_balancing);
                gateway(&mut s.waypoint, &mut f);
            }
            Some(Kind::Authorization(a)) => {
                f.texts.extend([
                    &mut a.name,
                    &mut a.namespace,
                    &mut a.target_gateway,
                    &mut a.target_service,
                ]);
                f.enums.extend([&mut a.scope, &mut a.action]);
                for rule in &mut a.rules {
                    for s in &mut rule.from {
                        for m in s
                            .principals
                            .iter_mut()
                            .chain(&mut s.not_principals)
                            .chain(&mut s.namespaces)
                            .chain(&mut s.not_namespaces)
                            .chain(&mut s.request_principals)
                            .chain(&mut s.not_request_principals)
                        {
                            string_match(m, &mut f);
                        }
                        for b in s
                            .ip_blocks
                            .iter_mut()
                            .chain(&mut s.not_ip_blocks)
                            .chain(&mut s.remote_ip_blocks)
                            .chain(&mut s.not_remote_ip_blocks)
                        {
                            ip_block(b, &mut f);
                        }
                    }
                    for o in &mut rule.to {
                        f.ports.extend(o.ports.iter_mut().chain(&mut o.not_ports));
                        f.texts
                            .extend(o.methods.iter_mut().chain(&mut o.not_methods));
                        for m in o
                            .hosts
                            .iter_mut()
                            .chain(&mut o.not_hosts)
                            .chain(&mut o.paths)
                            .chain(&mut o.not_paths)
                        {
                            string_match(m, &mut f);
                        }
                    }
                    for c in &mut rule.when {
                        f.texts.push(&mut c.key);
                        f.texts.extend(c.values.iter_mut().chain(&mut c.not_values));
                    }
                }
            }
            Some(Kind::Route(r)) => {
                f.texts
                    .extend([&mut r.name, &mut r.namespace, &mut r.kind, &mut r.spec_json]);
                f.texts.extend(r.parent_services.iter_mut());
            }
            Some(Kind::TrafficPolicy(t)) => {
                f.texts.extend([
                    &mut t.name,
                    &mut t.namespace,
                    &mut t.target_service,
                    &mut t.spec_json,
                ]);
            }
            Some(Kind::PeerAuthentication(p)) => {
                f.texts.extend([&mut p.name, &mut p.namespace]);
            }
            Some(Kind::RequestAuthentication(a)) => {
                f.texts.extend([
                    &mut a.name,
                    &mut a.namespace,
                    &mut a.target_gateway,
                    &mut a.target_service,
                    &mut a.spec_json,
                ]);
            }
            Some(Kind::ExternalService(x)) => {
                f.texts.extend([&mut x.name, &mut x.namespace]);
                f.texts.extend(x.hosts.iter_mut());
                for b in &mut x.addresses {
                    ip_block(b, &mut f);
                }
                for p in &mut x.ports {
                    f.ports.extend([&mut p.number, &mut p.target_port]);
                }
                for e in &mut x.endpoints {
                    f.texts.push(&mut e.address);
                }
            }
            None => {}
        }
    }
    f
}

fn edit(push: &mut pb::Push, e: &FieldEdit) {
    fn pick<'a, T>(v: &'a mut [&mut T], i: &Index) -> Option<&'a mut T> {
        if v.is_empty() {
            return None;
        }
        let n = i.index(v.len());
        Some(&mut *v[n])
    }
    match e {
        FieldEdit::DropResource(i) if !push.upserts.is_empty() => {
            let n = i.index(push.upserts.len());
            push.upserts.remove(n);
        }
        FieldEdit::CopyResource(i) if !push.upserts.is_empty() => {
            let n = i.index(push.upserts.len());
            push.upserts.push(push.upserts[n].clone());
        }
        FieldEdit::FlipFullState => push.full_state = !push.full_state,
        _ => {
            let mut f = fields(push);
            match e {
                FieldEdit::Address(i, a) => {
                    if let Some(x) = pick(&mut f.addresses, i) {
                        x.clone_from(a);
                    }
                }
                FieldEdit::Port(i, p) => {
                    if let Some(x) = pick(&mut f.ports, i) {
                        *x = *p;
                    }
                }
                FieldEdit::Enum(i, v) => {
                    if let Some(x) = pick(&mut f.enums, i) {
                        *x = *v;
                    }
                }
                FieldEdit::Text(i, t) => {
                    if let Some(x) = pick(&mut f.texts, i) {
                        x.clone_from(t);
                    }
                }
                FieldEdit::Prefix(i, p) => {
                    if let Some(x) = pick(&mut f.prefixes, i) {
                        *x = *p;
                    }
                }
                _ => {}
            }
        }
    }
}

/// A seed push with field edits, then (sometimes) its bytes mutated.
pub(crate) fn pushes() -> impl Strategy<Value = Vec<u8>> {
    let seeds = seed_pushes();
    let encoded: Vec<Vec<u8>> = seeds.iter().map(|p| p.encode_to_vec()).collect();
    let n = seeds.len();
    let structured =
        (0..n, prop::collection::vec(field_edit(), 1..6)).prop_map(move |(s, edits)| {
            let mut push = seeds[s].clone();
            for e in &edits {
                edit(&mut push, e);
            }
            push.encode_to_vec()
        });
    prop_oneof![
        3 => structured,
        1 => mutate::mutated(encoded, &[b"\x0a", b"\x12", b"\x22\x00", b"\xff\xff\xff\xff\x0f"], 4),
    ]
}

/// The property: see the module documentation.
pub(crate) fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(push) = pb::Push::decode(bytes) else {
        return Ok(());
    };
    // ztunnel, starting from a good state so that "nothing changed" means something.
    let mut store = ambit_ztunnel::state::Store::new(Some("node1"));
    let good = seed_pushes()[0].clone();
    store
        .apply(good)
        .map_err(|e| TestCaseError::fail(format!("seed refused: {e}")))?;
    let before = store.snapshot();
    match store.apply(push.clone()) {
        Err(_) => prop_assert!(
            Arc::ptr_eq(&before, &store.snapshot()),
            "a refused push changed the state"
        ),
        Ok(_) => {
            let state = store.snapshot();
            for w in state.workloads() {
                prop_assert!(state.workload_by_uid(&w.uid).is_some());
                for ip in &w.addresses {
                    let owner = state.workload_by_ip(*ip);
                    prop_assert!(
                        owner.is_some_and(|o| o.addresses.contains(ip)),
                        "address {ip} of {} finds no owner",
                        w.uid
                    );
                }
            }
            for s in state.services() {
                for vip in &s.vips {
                    prop_assert!(state.service_by_vip(*vip).is_some(), "VIP {vip} lost");
                }
            }
            serde_json::to_string(&*state)
                .map_err(|e| TestCaseError::fail(format!("config dump: {e}")))?;
            prop_assert!(
                store.apply(push.clone()).is_ok(),
                "the same push refused twice"
            );
        }
    }
    // The waypoint's conversion of the same push.
    let _ = ambit_waypoint::discovery::Resources::default().apply(&push);
    Ok(())
}

#[test]
fn discovery_pushes() {
    // Seeds first: they must all be accepted, or the target starts from nowhere.
    for (i, p) in seed_pushes().iter().enumerate() {
        let mut store = ambit_ztunnel::state::Store::new(Some("node1"));
        if let Err(e) = store.apply(p.clone()) {
            panic!("seed {i} refused: {e}");
        }
    }
    crate::fuzz("discovery", 1500, pushes(), |bytes| check(&bytes));
}
