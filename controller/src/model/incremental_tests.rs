//! The incremental derivation against the whole one: random changes to a small mesh,
//! applied both ways, must give the same resources and the same problems.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::model::{derive, error_chain, Object, SourceEvent};

/// A small deterministic generator (xorshift64*), so a failure replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn object(yaml: &str) -> Arc<Object> {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).expect("fixture is YAML");
    let field = |f: &str| value.get(f).and_then(|v| v.as_str()).expect("fixture type");
    let kind = Kind::from_type(field("apiVersion"), field("kind")).expect("known kind");
    let object = kind
        .deserialize(serde_yaml::Deserializer::from_str(yaml))
        .expect("fixture fits its kind");
    Arc::new(object)
}

const NAMESPACES: &[&str] = &["a", "b", "c", "ambit-system"];
const APPS: &[&str] = &["x", "y", "z"];

/// A random version of the object in slot `(kind, i)`: kinds and fields chosen to reach
/// every dependency of the derivation (selectors, waypoints, zones, outbound policies,
/// load balancing, endpoint slices, shared uids) and its problems (bad addresses,
/// unresolved waypoints, invalid labels and policies).
fn random_object(rng: &mut Rng, kind: Kind, i: usize) -> Arc<Object> {
    let ns = rng.pick(NAMESPACES);
    let app = rng.pick(APPS);
    let yaml = match kind {
        Kind::Namespace => {
            let labels = rng.pick(&[
                "{}",
                "{ambit.dev/dataplane-mode: ambient}",
                "{ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp}",
                "{ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: missing}",
                "{ambit.dev/dataplane-mode: ambient, ambit.dev/outbound-policy: REGISTRY_ONLY}",
                "{ambit.dev/outbound-policy: BOGUS}",
            ]);
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {labels}}}\n",
                NAMESPACES[i % NAMESPACES.len()]
            )
        }
        Kind::Pod => {
            let uid = if rng.chance(20) {
                "  uid: shared\n".to_string()
            } else {
                String::new()
            };
            let extra = rng.pick(&[
                "",
                ", version: v2",
                ", ambit.dev/use-waypoint: wp",
                ", ambit.dev/dataplane-mode: none",
                ", gateway.networking.k8s.io/gateway-name: wp",
            ]);
            let ip = if rng.chance(10) {
                "not-an-ip".to_string()
            } else {
                format!("10.0.0.{}", rng.below(30))
            };
            let phase = rng.pick(&["Running", "Running", "Running", "Succeeded"]);
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: {ns}\n{uid}  labels: {{app: {app}{extra}}}\nspec:\n  nodeName: n{}\n  containers: [{{name: c, image: i, ports: [{{name: web, containerPort: {}}}]}}]\nstatus:\n  phase: {phase}\n  podIP: {ip}\n",
                rng.below(3),
                8080 + rng.below(2)
            )
        }
        Kind::Service => {
            let selector = if rng.chance(15) {
                String::new()
            } else {
                format!("  selector: {{app: {app}}}\n")
            };
            let labels = rng.pick(&["{}", "{ambit.dev/use-waypoint: wp}", "{ambit.dev/use-waypoint: none}"]);
            let ip = if rng.chance(10) { "10.96.0.x" } else { "10.96.0.1" };
            let target = rng.pick(&["web", "8080"]);
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: {ns}, labels: {labels}}}\nspec:\n  clusterIP: {ip}\n{selector}  ports: [{{name: http, port: 80, targetPort: {target}}}]\n"
            )
        }
        Kind::EndpointSlice => format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e{i}, namespace: {ns}, labels: {{kubernetes.io/service-name: s{}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [10.0.0.{}]\n  conditions: {{ready: {}}}\n",
            rng.below(4),
            8080 + rng.below(2),
            rng.below(30),
            rng.chance(50)
        ),
        Kind::Gateway => {
            let status = if rng.chance(25) {
                String::new()
            } else {
                format!("status:\n  addresses: [{{value: 10.0.9.{}}}]\n", rng.below(3))
            };
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: {}}}\nspec:\n  gatewayClassName: ambit-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n{status}",
                NAMESPACES[i % NAMESPACES.len()]
            )
        }
        Kind::Node => {
            let labels = rng.pick(&["{}", "{topology.kubernetes.io/zone: z1}", "{topology.kubernetes.io/zone: z2}"]);
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: n{i}, labels: {labels}}}\n")
        }
        Kind::AuthorizationPolicy => {
            let selector = rng.pick(&["", "  selector: {matchLabels: {app: x}}\n", "  selector: {matchLabels: {app: y}}\n"]);
            let block = if rng.chance(15) { "300.0.0.0/8" } else { "192.0.2.0/24" };
            let action = rng.pick(&["ALLOW", "DENY"]);
            format!(
                "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap{i}, namespace: {ns}}}\nspec:\n{selector}  action: {action}\n  rules: [{{from: [{{source: {{ipBlocks: [{block}]}}}}]}}]\n"
            )
        }
        Kind::TrafficPolicy => {
            let lb = rng.pick(&["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"]);
            format!(
                "apiVersion: traffic.ambit.dev/v1\nkind: TrafficPolicy\nmetadata: {{name: tp{i}, namespace: {ns}}}\nspec:\n  targetRef: {{kind: Service, name: s{}}}\n  loadBalancer: {{simple: {lb}}}\n",
                rng.below(4)
            )
        }
        other => unreachable!("no fixture for {other:?}"),
    };
    object(&yaml)
}

/// The kinds changed, with how many objects of each may exist.
const SLOTS: &[(Kind, usize)] = &[
    (Kind::Namespace, 4),
    (Kind::Pod, 24),
    (Kind::Service, 6),
    (Kind::EndpointSlice, 3),
    (Kind::Gateway, 2),
    (Kind::Node, 3),
    (Kind::AuthorizationPolicy, 5),
    (Kind::TrafficPolicy, 3),
];

/// A random change: a new version of a slot's object, or a deletion of an object.
fn random_event(rng: &mut Rng, store: &Store) -> SourceEvent {
    let (kind, count) = SLOTS[rng.below(SLOTS.len())];
    if rng.chance(20) {
        let keys: Vec<ObjectKey> = store.of_kind(kind).filter_map(|o| o.key()).collect();
        if !keys.is_empty() {
            return SourceEvent::Delete(keys[rng.below(keys.len())].clone());
        }
    }
    let i = rng.below(count);
    SourceEvent::Apply(random_object(rng, kind, i))
}

/// Resources as compared: content and waypoint.
type Compared = BTreeMap<Key, (Resource, Option<String>)>;

/// A derivation's resources and problems in a comparable form.
fn full(store: &Store) -> (Compared, Vec<String>) {
    let d = derive(store, &ModelConfig::default());
    let resources = d
        .resources
        .into_iter()
        .map(|(k, r)| (k, (r.resource, r.waypoint)))
        .collect();
    let mut errors: Vec<String> = d.errors.iter().map(|e| error_chain(e)).collect();
    errors.sort();
    (resources, errors)
}

#[test]
fn random_changes_derived_incrementally_equal_a_full_derivation() {
    for seed in [1u64, 7, 42, 1234, 99_991] {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut store = Store::new();
        let mut incremental = Incremental::new(ModelConfig::default());
        let mut problems_seen = 0;
        for step in 0..250 {
            let mut changes = Changes::default();
            for _ in 0..1 + rng.below(3) {
                let event = if rng.chance(3) {
                    // A relist: every pod sent again, as the Kubernetes source does.
                    SourceEvent::Replace {
                        kinds: vec![Kind::Pod],
                        objects: store.of_kind(Kind::Pod).cloned().collect(),
                    }
                } else {
                    random_event(&mut rng, &store)
                };
                changes.record(&event);
                store.apply(event);
            }
            let outcome = incremental.update(&store, &changes, step + 1);
            let (want, want_errors) = full(&store);
            let got: Compared = incremental
                .resources()
                .iter()
                .map(|(k, e)| (k.clone(), (e.resource.clone(), e.waypoint.clone())))
                .collect();
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "seed {seed} step {step}: keys"
            );
            for (k, w) in &want {
                assert_eq!(&got[k], w, "seed {seed} step {step}: {k:?}");
            }
            let mut errors: Vec<String> = outcome.errors.iter().map(|e| error_chain(e)).collect();
            errors.sort();
            assert_eq!(errors, want_errors, "seed {seed} step {step}: errors");
            problems_seen += usize::from(!errors.is_empty());
        }
        // The fixtures reach the error paths too, or the comparison of problems is empty.
        assert!(
            problems_seen > 10,
            "seed {seed}: {problems_seen} steps with problems"
        );
    }
}

#[test]
fn a_change_keeps_the_entries_it_does_not_touch() {
    let mut store = Store::new();
    let mut rng = Rng(5);
    for (kind, count) in [(Kind::Namespace, 4), (Kind::Pod, 24), (Kind::Service, 6)] {
        for i in 0..count {
            store.insert(random_object(&mut rng, kind, i));
        }
    }
    let mut incremental = Incremental::new(ModelConfig::default());
    incremental.update(&store, &Changes::default(), 1);
    let before = incremental.resources().clone();
    // A new pod in a namespace of its own touches its workload only.
    let pod = object("apiVersion: v1\nkind: Pod\nmetadata: {name: solo, namespace: lonely}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.1.0.1}\n");
    let mut changes = Changes::default();
    for o in [
        object("apiVersion: v1\nkind: Namespace\nmetadata: {name: lonely}\n"),
        pod,
    ] {
        let event = SourceEvent::Apply(o);
        changes.record(&event);
        store.apply(event);
    }
    let outcome = incremental.update(&store, &changes, 2);
    assert!(outcome.changed);
    let after = incremental.resources();
    assert_eq!(after.len(), before.len() + 1);
    for (k, e) in &before {
        assert!(Arc::ptr_eq(e, &after[k]), "{k:?} was replaced");
    }
    assert_eq!(
        after[&Key {
            kind: ambit_proto::discovery::ResourceKind::Workload,
            name: "lonely/solo".into()
        }]
            .version,
        2
    );
}
