//! What the install contains: every object survives its k8s-openapi type unchanged, carries its
//! identity, and the security-relevant parts (RBAC, ztunnel's privileges, the controller's
//! hardening, the plugged-in root) are what the design says.

// Test helpers panic on bad fixtures, as the tests themselves do (the workspace allows unwrap in
// #[test] functions only).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ambit_manifests::pki::{PkiError, RootCa};
use ambit_manifests::{crds, rbac, render, InstallOptions, Object};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::Value;

/// Options that exercise every optional part.
fn full_options() -> InstallOptions {
    let (cert, key) = ca_pem(true);
    InstallOptions {
        namespace: "mesh".to_owned(),
        image_registry: "registry.example/ambit".to_owned(),
        tag: "v9".to_owned(),
        trust_domain: "example.org".to_owned(),
        root_ca: Some(RootCa::from_pem(cert, key, Path::new("c"), Path::new("k")).unwrap()),
        enable_waypoints: true,
    }
}

fn objects(opts: &InstallOptions) -> Vec<Object> {
    render(opts)
        .unwrap()
        .into_iter()
        .flat_map(|f| f.objects)
        .collect()
}

/// Numbers as f64: k8s-openapi keeps schema bounds (`minimum`, `maximum`) as f64, so `100` comes
/// back as `100.0`, which is the same value, not a lost field.
fn numbers_as_f64(v: &Value) -> Value {
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.iter().map(numbers_as_f64).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), numbers_as_f64(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Converts a document through its typed object and checks nothing was lost.
fn assert_round_trip(original: &Value, what: &str) -> Object {
    let object = Object::from_value(original.clone()).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let back = object.to_value().unwrap();
    assert_eq!(
        numbers_as_f64(&back),
        numbers_as_f64(original),
        "{what}: a field did not survive its type (misspelled?)"
    );
    object
}

#[test]
fn installed_files_survive_their_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("install");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            assert_round_trip(&value, &path.display().to_string());
            count += 1;
        }
    }
    assert!(count >= 10, "only {count} documents in {}", dir.display());
}

#[test]
fn crd_literals_survive_their_type() {
    for raw in crds::all_values() {
        assert_round_trip(&raw, raw["metadata"]["name"].as_str().unwrap());
    }
}

#[test]
fn every_object_has_identity_and_the_right_namespace() {
    for opts in [InstallOptions::default(), full_options()] {
        for object in objects(&opts) {
            let value = object.to_value().unwrap();
            let what = format!("{} {:?}", object.kind(), object.metadata().name);
            assert!(
                value["apiVersion"].is_string() && value["kind"].is_string(),
                "{what}"
            );
            assert!(
                object
                    .metadata()
                    .name
                    .as_deref()
                    .is_some_and(|n| !n.is_empty()),
                "{what}"
            );
            let labels = object.metadata().labels.clone().unwrap_or_default();
            assert_eq!(
                labels.get("app.kubernetes.io/part-of").map(String::as_str),
                Some("ambit"),
                "{what}"
            );
            if object.is_namespaced() {
                assert_eq!(
                    object.metadata().namespace.as_deref(),
                    Some(opts.namespace.as_str()),
                    "{what}"
                );
            } else {
                assert_eq!(object.metadata().namespace, None, "{what}");
            }
            assert_round_trip(&value, &what);
        }
    }
}

#[test]
fn options_reach_the_objects() {
    let opts = full_options();
    let yaml = ambit_manifests::to_yaml(&render(&opts).unwrap()).unwrap();
    assert!(yaml.contains("image: registry.example/ambit/ztunnel:v9"));
    assert!(yaml.contains("image: registry.example/ambit/controller:v9"));
    assert!(yaml.contains("value: registry.example/ambit/waypoint:v9"));
    assert!(yaml.contains("value: https://ambit-controller.mesh.svc:15012"));
    assert!(yaml.contains(r#"- "--root-namespace=mesh""#));
    assert!(yaml.contains(r#"- "--ca-dir=/etc/ambit/ca""#));
    assert!(yaml.contains("value: example.org"));
    assert!(!yaml.contains("ambit-system"), "default namespace leaked");
    let json: Value =
        serde_json::from_str(&ambit_manifests::to_json(&render(&opts).unwrap()).unwrap()).unwrap();
    assert_eq!(json["kind"], "List");
    assert_eq!(
        json["items"].as_array().unwrap().len(),
        objects(&opts).len()
    );
}

#[test]
fn yaml_reads_back_identically_even_with_yaml_1_1_words() {
    // `no`, `yes` and `on` are valid names but booleans to kubectl's YAML 1.1 parser; `1.10` is a
    // float to any YAML parser. They must come out quoted.
    let opts = InstallOptions {
        namespace: "no".to_owned(),
        trust_domain: "yes".to_owned(),
        tag: "1.10".to_owned(),
        image_registry: "on".to_owned(),
        ..full_options()
    };
    let files = render(&opts).unwrap();
    let yaml = ambit_manifests::to_yaml(&files).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let expected: Vec<Value> = objects(&opts)
        .iter()
        .map(|o| o.to_value().unwrap())
        .collect();
    assert_eq!(docs, expected);
    for word in ["no", "yes", "on", "1.10"] {
        for line in yaml.lines() {
            assert!(
                !line.ends_with(&format!(": {word}")),
                "unquoted {word}: {line}"
            );
            assert!(
                !line.ends_with(&format!("- {word}")),
                "unquoted {word}: {line}"
            );
        }
    }
}

#[test]
fn bad_options_are_refused_before_rendering() {
    for (opts, option) in [
        (
            InstallOptions {
                namespace: "Ambit".into(),
                ..Default::default()
            },
            "--namespace",
        ),
        (
            InstallOptions {
                namespace: "x\n  kind: Secret".into(),
                ..Default::default()
            },
            "--namespace",
        ),
        (
            InstallOptions {
                trust_domain: "td/ns/x".into(),
                ..Default::default()
            },
            "--trust-domain",
        ),
        (
            InstallOptions {
                image_registry: "a b".into(),
                ..Default::default()
            },
            "--image-registry",
        ),
        (
            InstallOptions {
                tag: "v1 latest".into(),
                ..Default::default()
            },
            "--tag",
        ),
    ] {
        let err = render(&opts).unwrap_err().to_string();
        assert!(err.starts_with(option), "{err}");
    }
}

// ---- RBAC ----------------------------------------------------------------------------------

/// (apiGroup, resource, verb) the design allows the controller, core install and waypoints.
fn allowed() -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    let mut add = |g: &str, resources: &[&str], verbs: &[&str]| {
        for r in resources {
            for v in verbs {
                set.insert((g.to_owned(), (*r).to_owned(), (*v).to_owned()));
            }
        }
    };
    let read = &["get", "list", "watch"][..];
    add(
        "",
        &["namespaces", "pods", "services", "serviceaccounts", "nodes"],
        read,
    );
    add("discovery.k8s.io", &["endpointslices"], read);
    add(
        "security.ambit.dev",
        &[
            "authorizationpolicies",
            "peerauthentications",
            "requestauthentications",
        ],
        read,
    );
    add("traffic.ambit.dev", &["trafficpolicies"], read);
    add("networking.ambit.dev", &["externalservices"], read);
    add(
        "gateway.networking.k8s.io",
        &["gateways", "httproutes", "grpcroutes", "gatewayclasses"],
        read,
    );
    add("authentication.k8s.io", &["tokenreviews"], &["create"]);
    add("apps", &["deployments"], &["create", "patch"]);
    add("", &["services", "serviceaccounts"], &["create", "patch"]);
    add(
        "gateway.networking.k8s.io",
        &["gateways/status", "gatewayclasses/status"],
        &["patch"],
    );
    set
}

#[test]
fn cluster_roles_grant_nothing_beyond_the_design() {
    let allowed = allowed();
    let mut roles = 0;
    for object in objects(&full_options()) {
        let Object::ClusterRole(role) = object else {
            continue;
        };
        roles += 1;
        let name = role.metadata.name.clone().unwrap();
        assert!(
            role.aggregation_rule.is_none(),
            "{name}: aggregation pulls in other roles' rules"
        );
        for rule in role.rules.unwrap() {
            assert!(rule.non_resource_urls.is_none(), "{name}: {rule:?}");
            assert!(rule.resource_names.is_none(), "{name}: {rule:?}");
            let groups = rule.api_groups.unwrap();
            let resources = rule.resources.unwrap();
            for x in groups.iter().chain(&resources).chain(&rule.verbs) {
                assert!(!x.contains('*'), "{name}: wildcard in {x:?}");
            }
            for g in &groups {
                for r in &resources {
                    assert_ne!(r, "secrets", "{name}: secrets");
                    for v in &rule.verbs {
                        assert!(
                            allowed.contains(&(g.clone(), r.clone(), v.clone())),
                            "{name}: {v} {g}/{r} is not in the design"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(roles, 2);
    // Waypoint rights only when asked for.
    let default_roles: Vec<_> = objects(&InstallOptions::default())
        .into_iter()
        .filter_map(|o| match o {
            Object::ClusterRole(r) => r.metadata.name,
            _ => None,
        })
        .collect();
    assert_eq!(default_roles, [rbac::CONTROLLER_ROLE]);
}

#[test]
fn the_namespaced_role_reaches_only_the_ca_secret_root_configmap_and_lease() {
    let opts = full_options();
    let roles: Vec<_> = objects(&opts)
        .into_iter()
        .filter_map(|o| match o {
            Object::Role(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0].metadata.namespace.as_deref(), Some("mesh"));
    let mut grants = BTreeSet::new();
    for rule in roles[0].rules.clone().unwrap() {
        let group = rule.api_groups.clone().unwrap();
        assert_eq!(group.len(), 1);
        for r in rule.resources.unwrap() {
            // Core objects, except the leader election's Lease.
            let expected_group = if r == "leases" {
                "coordination.k8s.io"
            } else {
                ""
            };
            assert_eq!(group[0], expected_group, "{r}");
            for v in &rule.verbs {
                grants.insert((r.clone(), v.clone(), rule.resource_names.clone()));
            }
        }
    }
    let named = |n: &str| Some(vec![n.to_owned()]);
    let expected = BTreeSet::from([
        ("secrets".to_owned(), "create".to_owned(), None),
        ("secrets".to_owned(), "get".to_owned(), named("ambit-ca")),
        ("configmaps".to_owned(), "create".to_owned(), None),
        (
            "configmaps".to_owned(),
            "get".to_owned(),
            named("ambit-root-cert"),
        ),
        (
            "configmaps".to_owned(),
            "patch".to_owned(),
            named("ambit-root-cert"),
        ),
        ("leases".to_owned(), "create".to_owned(), None),
        (
            "leases".to_owned(),
            "get".to_owned(),
            named("ambit-controller"),
        ),
        (
            "leases".to_owned(),
            "update".to_owned(),
            named("ambit-controller"),
        ),
    ]);
    assert_eq!(grants, expected);
}

#[test]
fn only_the_controller_is_bound_and_ztunnel_has_no_token() {
    let opts = full_options();
    for object in objects(&opts) {
        match object {
            Object::ClusterRoleBinding(b) => {
                assert!([rbac::CONTROLLER_ROLE, rbac::WAYPOINT_ROLE]
                    .contains(&b.role_ref.name.as_str()));
                assert_eq!(b.role_ref.kind, "ClusterRole");
                let subjects = b.subjects.unwrap();
                assert_eq!(subjects.len(), 1);
                assert_eq!(subjects[0].kind, "ServiceAccount");
                assert_eq!(subjects[0].name, "ambit-controller");
                assert_eq!(subjects[0].namespace.as_deref(), Some("mesh"));
            }
            Object::RoleBinding(b) => {
                assert_eq!(b.role_ref.name, rbac::CA_ROLE);
                assert_eq!(b.role_ref.kind, "Role");
                assert_eq!(b.metadata.namespace.as_deref(), Some("mesh"));
                let subjects = b.subjects.unwrap();
                assert_eq!(subjects.len(), 1);
                assert_eq!(subjects[0].name, "ambit-controller");
            }
            Object::ServiceAccount(sa) if sa.metadata.name.as_deref() == Some("ambit-ztunnel") => {
                assert_eq!(sa.automount_service_account_token, Some(false));
            }
            _ => {}
        }
    }
}

// ---- ztunnel ---------------------------------------------------------------------------------

fn ztunnel(opts: &InstallOptions) -> (DaemonSet, PodSpec, Container) {
    let ds = objects(opts)
        .into_iter()
        .find_map(|o| match o {
            Object::DaemonSet(ds) => Some(ds),
            _ => None,
        })
        .unwrap();
    let pod = ds.spec.template.spec.clone().unwrap();
    let container = pod.containers[0].clone();
    (ds, pod, container)
}

#[test]
fn ztunnel_has_exactly_the_capabilities_it_needs() {
    let (_, pod, c) = ztunnel(&InstallOptions::default());
    let sc = c.security_context.unwrap();
    assert_ne!(sc.privileged, Some(true));
    assert_ne!(
        pod.host_network,
        Some(true),
        "in-pod mode: ztunnel has its own netns"
    );
    assert_ne!(pod.host_pid, Some(true));
    let caps = sc.capabilities.unwrap();
    let added: BTreeSet<_> = caps.add.unwrap().into_iter().collect();
    assert_eq!(
        added,
        BTreeSet::from(["NET_ADMIN".into(), "NET_RAW".into(), "SYS_ADMIN".into()])
    );
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    // The API server refuses allowPrivilegeEscalation=false together with SYS_ADMIN.
    assert_eq!(sc.allow_privilege_escalation, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
}

#[test]
fn ztunnel_mounts_the_host_netns_and_node_dirs_and_nothing_else_from_the_host() {
    let (_, pod, c) = ztunnel(&InstallOptions::default());
    let volumes = pod.volumes.unwrap();
    let host_paths: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.host_path.as_ref())
        .map(|h| h.path.as_str())
        .collect();
    assert_eq!(
        host_paths,
        [
            "/var/run/netns",
            "/var/lib/ambit/ztunnel",
            "/opt/cni/bin",
            "/etc/cni/net.d"
        ]
    );
    // ztunnel itself mounts neither CNI directory; only the installer does.
    let ztunnel_mounts: Vec<_> = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert!(!ztunnel_mounts.iter().any(|n| n.starts_with("cni-")));
    let mount_of = |path: &str| {
        let volume = volumes
            .iter()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == path))
            .unwrap();
        c.volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .find(|m| m.name == volume.name)
            .unwrap()
    };
    let mount = mount_of("/var/run/netns");
    assert_eq!(mount.mount_path, "/var/run/netns");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(mount.read_only, Some(true));
    // The node directory: written by ztunnel (state, certificates), read back after a restart.
    let data = mount_of("/var/lib/ambit/ztunnel");
    assert_eq!(data.mount_path, "/var/lib/ambit/ztunnel");
    assert_ne!(data.read_only, Some(true));
    let env = c.env.clone().unwrap();
    assert!(env.iter().any(
        |e| e.name == "AMBIT_DATA_DIR" && e.value.as_deref() == Some("/var/lib/ambit/ztunnel")
    ));
    // The CA token: projected, for the ambit-ca audience.
    let token = volumes
        .iter()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.clone().unwrap())
        .find_map(|s| s.service_account_token)
        .unwrap();
    assert_eq!(token.audience.as_deref(), Some("ambit-ca"));
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn an_init_container_installs_the_cni_plugin_without_privileges() {
    let opts = InstallOptions::default();
    let (_, pod, _) = ztunnel(&opts);
    let init = pod.init_containers.unwrap();
    assert_eq!(init.len(), 1);
    let c = &init[0];
    assert_eq!(c.image, Some(opts.image("ztunnel")));
    assert_eq!(
        c.command.clone().unwrap(),
        ["/usr/local/bin/ambit-cni", "install"]
    );
    let env: BTreeMap<_, _> = c
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect();
    assert_eq!(
        env["AMBIT_CNI_BIN_DIR"].as_deref(),
        Some("/host/opt/cni/bin")
    );
    assert_eq!(
        env["AMBIT_CNI_CONF_DIR"].as_deref(),
        Some("/host/etc/cni/net.d")
    );
    assert_eq!(
        env["AMBIT_DATA_DIR"].as_deref(),
        Some("/var/lib/ambit/ztunnel")
    );
    assert!(env.contains_key("NODE_NAME"));
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.add, None);
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    let mounts: BTreeSet<_> = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.mount_path))
        .collect();
    assert_eq!(
        mounts,
        BTreeSet::from([
            ("cni-bin".to_owned(), "/host/opt/cni/bin".to_owned()),
            ("cni-conf".to_owned(), "/host/etc/cni/net.d".to_owned()),
        ])
    );
}

#[test]
fn ztunnel_is_ready_on_15021_runs_everywhere_and_drains() {
    let (ds, pod, c) = ztunnel(&InstallOptions::default());
    let probe = c.readiness_probe.unwrap().http_get.unwrap();
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    let ports: BTreeSet<_> = c.ports.unwrap().iter().map(|p| p.container_port).collect();
    assert_eq!(
        ports,
        BTreeSet::from([15020, 15021]),
        "15000 is localhost-only; 15001/6/8 live in pods' netns"
    );
    let tolerations = pod.tolerations.unwrap();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));
    assert!(pod.termination_grace_period_seconds.unwrap() >= 10);
    let env = c.env.unwrap();
    let value = |name: &str| env.iter().find(|e| e.name == name).unwrap().value.clone();
    // Drain ends before the kubelet's SIGKILL, also the long one after an upgrade.
    let drain: i64 = value("AMBIT_DRAIN_SECONDS").unwrap().parse().unwrap();
    assert!(drain < pod.termination_grace_period_seconds.unwrap());
    let upgrade: i64 = value("AMBIT_UPGRADE_DRAIN_SECONDS")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        upgrade >= 3600,
        "an upgrade keeps connections at least an hour"
    );
    assert!(upgrade < pod.termination_grace_period_seconds.unwrap());
    // Upgrades surge: the new pod takes over from the old one before it is deleted.
    let rolling = ds.spec.update_strategy.clone().unwrap();
    assert_eq!(rolling.type_.as_deref(), Some("RollingUpdate"));
    let rolling = rolling.rolling_update.unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(
        value("AMBIT_CREDENTIAL_FILE").as_deref(),
        Some("/var/run/secrets/tokens/ambit-ca-token")
    );
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    assert!(c
        .resources
        .unwrap()
        .requests
        .unwrap()
        .contains_key("memory"));
}

// ---- controller ------------------------------------------------------------------------------

#[test]
fn controller_is_hardened_and_exposes_15012_and_15014() {
    let objects = objects(&InstallOptions::default());
    let deployment = objects
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d) => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    let pod = deployment.spec.template.spec.unwrap();
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    // The CA Secret is readable by the non-root user through its group.
    assert!(psc.fs_group.is_some() && psc.fs_group == psc.run_as_group);
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
    let service = objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    let ports: BTreeSet<_> = service
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, BTreeSet::from([15012, 15014]));
}

#[test]
fn the_controller_runs_two_replicas_that_elect_a_leader_and_survive_a_drain() {
    let objects = objects(&InstallOptions::default());
    let deployment = objects
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d) => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(deployment.spec.replicas, Some(2));
    let selector = deployment.spec.selector.clone();
    let pod = deployment.spec.template.spec.unwrap();
    // Its pod name is its identity in the Lease.
    let env = pod.containers[0].env.clone().unwrap();
    let pod_name = env.iter().find(|e| e.name == "POD_NAME").unwrap();
    assert_eq!(
        pod_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.name")
    );
    // Spread over nodes, so losing one node leaves a replica.
    let spread = pod
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
        .unwrap();
    assert_eq!(
        spread[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    // A drain takes at most one replica at a time.
    let pdb = objects
        .iter()
        .find_map(|o| match o {
            Object::PodDisruptionBudget(p) => Some(p.clone()),
            _ => None,
        })
        .unwrap();
    let spec = pdb.spec.unwrap();
    assert_eq!(
        spec.min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        spec.selector.unwrap().match_labels,
        selector.match_labels,
        "the budget covers exactly the controller's pods"
    );
}

// ---- plugged-in root -------------------------------------------------------------------------

/// A self-signed certificate (a CA or not) and its PKCS#8 key, PEM.
fn ca_pem(is_ca: bool) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    if is_ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn plugged_in_root_becomes_a_secret_and_a_trust_anchor() {
    let opts = full_options();
    let ca = opts.root_ca.clone().unwrap();
    let objects = objects(&opts);
    let secret = objects
        .iter()
        .find_map(|o| match o {
            Object::Secret(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    let data = secret.data.unwrap();
    assert_eq!(data["ca.crt"].0, ca.cert_chain_pem.as_bytes());
    assert_eq!(data["ca.key"].0, ca.key_pem.as_bytes());
    let anchor = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) => c.data.clone(),
            _ => None,
        })
        .unwrap();
    assert_eq!(anchor["root-cert.pem"].trim(), ca.cert_chain_pem.trim());
    assert!(!anchor["root-cert.pem"].contains("PRIVATE"));
    // No root, no Secret.
    assert!(!crate::objects(&InstallOptions::default())
        .iter()
        .any(|o| matches!(o, Object::Secret(_))));
}

#[test]
fn bad_roots_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (cert, key) = ca_pem(true);
    let (_, other_key) = ca_pem(true);
    let (leaf, leaf_key) = ca_pem(false);
    let cert_p = write("ca.crt", &cert);
    let key_p = write("ca.key", &key);

    assert!(RootCa::from_files(&cert_p, &key_p).is_ok());

    let missing = dir.path().join("nope.crt");
    let err = RootCa::from_files(&missing, &key_p).unwrap_err();
    assert!(matches!(err, PkiError::Read { .. }));
    assert!(err.to_string().contains("nope.crt"), "{err}");

    let err = RootCa::from_files(&cert_p, &write("other.key", &other_key)).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("other.key"));

    let err =
        RootCa::from_files(&write("leaf.crt", &leaf), &write("leaf.key", &leaf_key)).unwrap_err();
    assert!(matches!(err, PkiError::NotCa { .. }), "{err}");

    let err = RootCa::from_files(&key_p, &key_p).unwrap_err();
    assert!(matches!(err, PkiError::NoCertificate { .. }), "{err}");

    let err = RootCa::from_files(&cert_p, &cert_p).unwrap_err();
    assert!(matches!(err, PkiError::BadKey { .. }), "{err}");
}

// ---- waypoint template ---------------------------------------------------------------------

#[test]
fn waypoint_objects_survive_their_types_and_are_hardened() {
    let opts = InstallOptions::default();
    let image = opts.image("waypoint");
    let address = opts.controller_address();
    let w = ambit_manifests::waypoint::render(&ambit_manifests::waypoint::WaypointParams {
        name: "waypoint",
        namespace: "bookinfo",
        gateway_uid: "6a0c9c6e-0000-4000-8000-000000000001",
        image: &image,
        trust_domain: &opts.trust_domain,
        controller_address: &address,
    })
    .unwrap();
    for object in [
        Object::ServiceAccount(w.service_account.clone()),
        Object::Deployment(w.deployment.clone()),
        Object::Service(w.service.clone()),
    ] {
        let value = object.to_value().unwrap();
        assert_round_trip(&value, object.kind());
        assert_eq!(object.metadata().namespace.as_deref(), Some("bookinfo"));
    }
    let pod = w.deployment.spec.template.spec.unwrap();
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let sc = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    assert!(caps.add.is_none(), "a waypoint needs no capability");
    assert_eq!(pod.automount_service_account_token, Some(false));
}
