//! The local source against a real folder: files written, changed, broken and removed
//! while it watches; assertions on the events the model would receive and the errors an
//! operator would read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_controller::model::{
    error_chain, Kind, Object, ObjectKey, SourceBatch, SourceEvent, SourceSink,
};
use ambit_controller::source::local::{LocalError, LocalOptions, LocalSource};
use tokio::sync::{mpsc, watch};

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {ambit.dev/dataplane-mode: ambient}\n";

fn pod(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{app: {app}}}\nspec:\n  nodeName: node-a\n  containers: [{{name: c, image: i}}]\nstatus:\n  podIP: 10.0.0.{}\n",
        name.len()
    )
}

struct Harness {
    dir: tempfile::TempDir,
    rx: mpsc::Receiver<SourceBatch>,
    errors: watch::Receiver<Arc<Vec<LocalError>>>,
    scans: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(files: &[(&str, &str)], rescan: Duration) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        let (sink, rx) = SourceSink::detached("local", 16);
        let source = LocalSource::new(
            dir.path(),
            LocalOptions {
                debounce: Duration::from_millis(50),
                rescan,
                ..LocalOptions::default()
            },
        );
        let errors = source.errors();
        let scans = source.scans();
        let task = tokio::spawn(async move {
            let _ = source.run(sink).await;
        });
        Harness {
            dir,
            rx,
            errors,
            scans,
            task,
        }
    }

    fn write(&self, name: &str, text: &str) {
        // Write-then-rename, as editors and `kubectl`-style tools do, so the source never
        // reads a half-written file.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename");
    }

    async fn next(&mut self) -> Vec<SourceEvent> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("no events within 10s")
            .expect("source stopped")
            .events
    }

    async fn quiet(&mut self) {
        if let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(400), self.rx.recv()).await
        {
            panic!("unexpected events: {:?}", summary(&b.events));
        }
    }

    async fn errors(&mut self) -> Vec<String> {
        let errs = tokio::time::timeout(
            Duration::from_secs(10),
            self.errors.wait_for(|e| !e.is_empty()),
        )
        .await
        .expect("no error reported within 10s")
        .expect("source stopped")
        .clone();
        lines(&errs)
    }

    /// Writes a broken `text` into `name` and expects exactly one error, naming each of `wants`.
    async fn expect_error(&mut self, name: &str, text: &str, wants: &[&str]) {
        self.write(name, text);
        let errors = self.errors().await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        for want in wants {
            assert!(errors[0].contains(want), "{:?} lacks {want:?}", errors[0]);
        }
    }

    /// Writes `good` back into `name`, so the next case starts from the same last good state:
    /// the errors clear and nothing else moves.
    async fn restore(&mut self, name: &str, good: &str) {
        self.write(name, good);
        tokio::time::timeout(
            Duration::from_secs(10),
            self.errors.wait_for(|e| e.is_empty()),
        )
        .await
        .expect("errors clear")
        .expect("source");
        self.quiet().await;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Errors as an operator reads them, one line each.
fn lines(errors: &[LocalError]) -> Vec<String> {
    errors.iter().map(|e| error_chain(e)).collect()
}

/// Events as short strings: `apply Pod demo/a app=x`, `delete Pod demo/a`, `synced`.
fn summary(events: &[SourceEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            SourceEvent::Apply(o) => {
                let key = o.key().expect("key");
                let app = match &**o {
                    Object::Pod(p) => p
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("app"))
                        .cloned()
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                format!("apply {key} {app}").trim_end().to_string()
            }
            SourceEvent::Delete(k) => format!("delete {k}"),
            SourceEvent::Replace { .. } => "replace".into(),
            SourceEvent::Synced => "synced".into(),
        })
        .collect()
}

#[tokio::test]
async fn initial_state_changes_and_removals_are_events() {
    let pods = format!("{}---\n{}", pod("a", "web"), pod("bb", "db"));
    let mut h = Harness::start(
        &[("00-ns.yaml", NS), ("pods.yml", &pods)],
        Duration::from_secs(3600),
    );
    assert_eq!(
        summary(&h.next().await),
        vec![
            "apply Namespace demo",
            "apply Pod demo/a web",
            "apply Pod demo/bb db",
            "synced"
        ]
    );

    // Change one pod: only that pod is sent.
    h.write(
        "pods.yml",
        &format!("{}---\n{}", pod("a", "web2"), pod("bb", "db")),
    );
    assert_eq!(summary(&h.next().await), vec!["apply Pod demo/a web2"]);

    // Remove one object from a file, then a whole file.
    h.write("pods.yml", &pod("a", "web2"));
    assert_eq!(summary(&h.next().await), vec!["delete Pod demo/bb"]);
    h.write("more.json", r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"demo"},"spec":{"ports":[{"port":80}]}}"#);
    assert_eq!(summary(&h.next().await), vec!["apply Service demo/web"]);
    std::fs::remove_file(h.dir.path().join("more.json")).expect("rm");
    assert_eq!(summary(&h.next().await), vec!["delete Service demo/web"]);
    assert!(h.errors.borrow().is_empty());
}

#[tokio::test]
async fn periodic_rescan_catches_what_the_watcher_missed() {
    // With the watcher's notifications coalesced into rescans, the periodic rescan is the
    // safety net; here it is the only trigger fast enough to matter.
    let mut h = Harness::start(&[("ns.yaml", NS)], Duration::from_millis(200));
    assert_eq!(
        summary(&h.next().await),
        vec!["apply Namespace demo", "synced"]
    );
    std::fs::write(h.dir.path().join("p.yaml"), pod("a", "web")).expect("write");
    assert_eq!(summary(&h.next().await), vec!["apply Pod demo/a web"]);
}

#[tokio::test]
async fn a_broken_file_keeps_its_last_good_objects() {
    let pods = format!("{}---\n{}", pod("a", "web"), pod("bb", "db"));
    let mut h = Harness::start(
        &[
            ("ns.yaml", NS),
            ("pods.yaml", &pods),
            ("other.yaml", &pod("c", "x")),
        ],
        Duration::from_secs(3600),
    );
    assert_eq!(summary(&h.next().await).len(), 5);

    let cases: &[(&str, &[&str])] = &[
        // Bad YAML in the second document: line 14 of the file.
        ("{pod_a}---\napiVersion: v1\nkind: Pod\nmetadata: {name: [\n", &["pods.yaml", "document 2", "line 16"]),
        // Wrong type, reported with its position.
        ("{pod_a}---\napiVersion: v1\nkind: Pod\nmetadata: {name: bb, namespace: demo}\nspec:\n  nodeName: [1, 2]\n  containers: []\n", &["pods.yaml", "document 2", "line 17", "invalid type"]),
        // A missing required field.
        ("{pod_a}---\napiVersion: traffic.ambit.dev/v1\nkind: TrafficPolicy\nmetadata: {name: tp, namespace: demo}\nspec: {rateLimit: {tokensPerFill: 1, fillInterval: 1s, maxTokens: 1}}\n", &["pods.yaml", "document 2", "missing field `targetRef`"]),
        // A misspelt policy field, which would otherwise widen the rule.
        ("{pod_a}---\napiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  rules: [{from: [{source: {principal: [a]}}]}]\n", &["pods.yaml", "document 2", "unknown field spec.rules[0].from[0].source.principal"]),
        // RequestAuthentication: a key set that is not JSON, an empty issuer, a selector
        // instead of targetRefs, a misspelt field, a missing issuer.
        ("{pod_a}---\napiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, name: web}]\n  jwtRules: [{issuer: idp, jwks: 'keys go here'}]\n", &["pods.yaml", "document 2: spec.jwtRules[0].jwks: not a JSON Web Key Set"]),
        ("{pod_a}---\napiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, name: web}]\n  jwtRules: [{issuer: '', jwksUri: 'https://idp.example/keys'}]\n", &["pods.yaml", "document 2: spec.jwtRules[0].issuer: must not be empty"]),
        ("{pod_a}---\napiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: demo}\nspec:\n  selector: {matchLabels: {app: web}}\n  jwtRules: [{issuer: idp, jwksUri: 'https://idp.example/keys'}]\n", &["pods.yaml", "document 2: spec.selector: tokens are validated by waypoints", "targetRefs"]),
        ("{pod_a}---\napiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, name: web}]\n  jwtRules: [{issuer: idp, jwksURI: 'https://idp.example/keys'}]\n", &["pods.yaml", "document 2", "unknown field spec.jwtRules[0].jwksURI"]),
        ("{pod_a}---\napiVersion: security.ambit.dev/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, name: web}]\n  jwtRules: [{jwksUri: 'https://idp.example/keys'}]\n", &["pods.yaml", "document 2", "missing field `issuer`"]),
        // An unknown kind.
        ("{pod_a}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm, namespace: demo}\n", &["pods.yaml", "document 2", "unknown kind v1/ConfigMap"]),
        // No name.
        ("{pod_a}---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: demo}\nspec: {containers: []}\n", &["pods.yaml", "document 2", "metadata.name"]),
        // A namespace that does not exist.
        ("{pod_a}---\napiVersion: v1\nkind: Pod\nmetadata: {name: bb, namespace: ghost}\nspec: {containers: []}\n", &["pods.yaml", "document 2", "Pod ghost/bb", "\"ghost\", which does not exist"]),
    ];
    for (text, wants) in cases {
        // The first document changes too, so a partial apply would show up as an event.
        let text = text.replace("{pod_a}", &pod("a", "changed"));
        h.expect_error("pods.yaml", &text, wants).await;
        // Other files still update while this one is broken.
        h.write(
            "other.yaml",
            &pod("c", &format!("x{}", wants.len() + text.len())),
        );
        let events = summary(&h.next().await);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].starts_with("apply Pod demo/c"), "{events:?}");
        h.restore("pods.yaml", &pods).await;
    }
}

#[tokio::test]
async fn removing_a_namespace_is_reported_against_the_objects_in_it() {
    let mut h = Harness::start(
        &[("ns.yaml", NS), ("pods.yaml", &pod("a", "web"))],
        Duration::from_secs(3600),
    );
    assert_eq!(summary(&h.next().await).len(), 3);
    std::fs::remove_file(h.dir.path().join("ns.yaml")).expect("rm");
    // The namespace goes; the pod file now refers to a missing namespace, so it keeps its
    // last good objects and is reported.
    assert_eq!(summary(&h.next().await), vec!["delete Namespace demo"]);
    let errors = h.errors().await;
    assert!(
        errors[0].contains("pods.yaml: document 1") && errors[0].contains("\"demo\""),
        "{errors:?}"
    );
}

#[tokio::test]
async fn a_duplicate_object_is_reported_and_the_first_copy_served() {
    let mut h = Harness::start(
        &[("a.yaml", &format!("{NS}---\n{}", pod("p", "first")))],
        Duration::from_secs(3600),
    );
    assert_eq!(
        summary(&h.next().await),
        vec!["apply Namespace demo", "apply Pod demo/p first", "synced"]
    );
    h.write("b.yaml", &pod("p", "second"));
    let errors = h.errors().await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("b.yaml: document 1: Pod demo/p is already defined in")
            && errors[0].contains("a.yaml"),
        "{errors:?}"
    );
    h.quiet().await;
    // Removing the first copy makes the other one the definition.
    std::fs::write(h.dir.path().join("a.yaml"), NS).expect("write");
    assert_eq!(summary(&h.next().await), vec!["apply Pod demo/p second"]);
}

#[test]
fn objects_default_to_the_default_namespace() {
    let objects = ambit_controller::source::local::parse_file(
        Path::new("x.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    )
    .expect("parse");
    assert_eq!(
        objects[0].object.key(),
        Some(ObjectKey::new(Kind::Service, "default", "s"))
    );
}

#[tokio::test]
async fn a_folder_that_keeps_changing_is_still_rescanned() {
    // Writes every 20 ms never leave the 50 ms debounce quiet; the periodic rescan is an
    // hour away. Changes must still arrive while the writing goes on.
    let mut h = Harness::start(&[("ns.yaml", NS)], Duration::from_secs(3600));
    assert_eq!(
        summary(&h.next().await),
        vec!["apply Namespace demo", "synced"]
    );
    let dir = h.dir.path().to_path_buf();
    let writer = tokio::spawn(async move {
        for i in 0..250 {
            let tmp = dir.join(".churn.tmp");
            std::fs::write(&tmp, pod("a", &format!("v{i}"))).expect("write");
            std::fs::rename(&tmp, dir.join("churn.yaml")).expect("rename");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let first = tokio::time::timeout(Duration::from_millis(2500), h.rx.recv())
        .await
        .expect("no rescan while the folder kept changing")
        .expect("source stopped");
    assert!(
        summary(&first.events)[0].starts_with("apply Pod demo/a v"),
        "{:?}",
        summary(&first.events)
    );
    assert!(
        !writer.is_finished(),
        "the change arrived only after the writes stopped"
    );
    writer.abort();
}

#[tokio::test]
async fn a_bad_peer_authentication_is_refused_naming_file_document_and_field_and_the_good_one_stays(
) {
    let good = "apiVersion: security.ambit.dev/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";
    let mut h = Harness::start(
        &[
            ("ns.yaml", NS),
            ("pa.yaml", good),
            ("other.yaml", &pod("c", "x")),
        ],
        Duration::from_secs(3600),
    );
    assert_eq!(
        summary(&h.next().await),
        vec![
            "apply Namespace demo",
            "apply Pod demo/c x",
            "apply PeerAuthentication demo/strict",
            "synced"
        ]
    );
    // The good policy is document 1; each bad version keeps it and breaks document 2.
    let doc2 = |spec: &str| {
        format!("{good}---\napiVersion: security.ambit.dev/v1\nkind: PeerAuthentication\nmetadata: {{name: web, namespace: demo}}\nspec:\n{spec}")
    };
    let cases: &[(String, &[&str])] = &[
        // A mode Istio does not define, at the top and per port.
        (
            doc2("  mtls: {mode: STRIKT}\n"),
            &["pa.yaml", "document 2", "spec.mtls.mode: unknown variant `STRIKT`"],
        ),
        (
            doc2("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8080: {mode: OFF}\n"),
            &["pa.yaml", "document 2", "spec.portLevelMtls", "unknown variant `OFF`"],
        ),
        // Ports out of range.
        (
            doc2("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    70000: {mode: PERMISSIVE}\n"),
            &["pa.yaml: document 2: spec.portLevelMtls[70000]: \"70000\" is not a port number (1-65535)"],
        ),
        (
            doc2("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    \"0\": {mode: PERMISSIVE}\n"),
            &["pa.yaml: document 2: spec.portLevelMtls[0]: \"0\" is not a port number"],
        ),
        // Port-level modes without a selector (Istio refuses them too).
        (
            doc2("  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n"),
            &["pa.yaml: document 2: spec.portLevelMtls: port-level modes need a selector"],
        ),
        // A misspelt field, which would otherwise be dropped silently.
        (
            doc2("  mtsl: {mode: STRICT}\n"),
            &["pa.yaml", "document 2", "unknown field spec.mtsl"],
        ),
    ];
    for (text, wants) in cases {
        h.expect_error("pa.yaml", text, wants).await;
        // The file's last good objects stay: no delete of demo/strict, nothing applied.
        h.quiet().await;
        // Other files still update meanwhile.
        h.write("other.yaml", &pod("c", &format!("x{}", text.len())));
        let events = summary(&h.next().await);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].starts_with("apply Pod demo/c"), "{events:?}");
        h.restore("pa.yaml", good).await;
    }
    // A good port-level policy is taken.
    h.write(
        "pa.yaml",
        &doc2("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n"),
    );
    assert_eq!(
        summary(&h.next().await),
        vec!["apply PeerAuthentication demo/web"]
    );
}

#[tokio::test]
async fn a_bad_external_service_is_refused_naming_file_document_and_field_and_the_good_one_stays() {
    let good = "apiVersion: networking.ambit.dev/v1\nkind: ExternalService\nmetadata: {name: api, namespace: demo}\nspec: {hosts: [api.example.com], addresses: [192.0.2.10], ports: [{number: 443, name: https, protocol: HTTPS}]}\n";
    let mut h = Harness::start(
        &[
            ("ns.yaml", NS),
            ("xs.yaml", good),
            ("other.yaml", &pod("c", "x")),
        ],
        Duration::from_secs(3600),
    );
    assert_eq!(
        summary(&h.next().await),
        vec![
            "apply Namespace demo",
            "apply Pod demo/c x",
            "apply ExternalService demo/api",
            "synced"
        ]
    );
    // The good service is document 1; each bad version keeps it and breaks document 2.
    let doc2 = |spec: &str| {
        format!("{good}---\napiVersion: networking.ambit.dev/v1\nkind: ExternalService\nmetadata: {{name: db, namespace: demo}}\nspec:\n{spec}")
    };
    let cases: &[(String, &[&str])] = &[
        (
            doc2("  hosts: [\"db..example.com\"]\n  ports: [{number: 5432}]\n"),
            &["xs.yaml: document 2: spec.hosts[0]: \"db..example.com\" is not a DNS name"],
        ),
        (
            doc2("  hosts: [db.example.com]\n  ports: [{number: 70000}]\n"),
            &["xs.yaml: document 2: spec.ports[0].number: 70000 is not a port number (1-65535)"],
        ),
        (
            doc2("  hosts: [db.example.com]\n  addresses: [10.1.2.300]\n  ports: [{number: 5432}]\n"),
            &["xs.yaml: document 2: spec.addresses[0]: \"10.1.2.300\" is not an IP address or CIDR"],
        ),
        (
            doc2("  hosts: [db.example.com]\n  ports: [{number: 5432}]\n  resolution: STATIC\n"),
            &["xs.yaml: document 2: spec.endpoints: resolution STATIC needs at least one endpoint"],
        ),
        (
            doc2("  hosts: [db.example.com]\n  ports: [{number: 5432}]\n  resolution: MAGIC\n"),
            &["xs.yaml", "document 2", "spec.resolution: unknown variant `MAGIC`"],
        ),
        // A misspelt field, which would otherwise be dropped silently.
        (
            doc2("  hosts: [db.example.com]\n  port: [{number: 5432}]\n"),
            &["xs.yaml", "document 2", "unknown field spec.port"],
        ),
    ];
    for (text, wants) in cases {
        h.expect_error("xs.yaml", text, wants).await;
        // The file's last good objects stay: no delete of demo/api, nothing applied.
        h.quiet().await;
        h.restore("xs.yaml", good).await;
    }
    // A bad outbound policy label on a namespace is refused the same way.
    h.write(
        "ns.yaml",
        &NS.replace(
            "ambient}",
            "ambient, ambit.dev/outbound-policy: REGISTRY_ONY}",
        ),
    );
    let errors = h.errors().await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("ns.yaml: document 1: metadata.labels[ambit.dev/outbound-policy]: \"REGISTRY_ONY\" is not ALLOW_ANY or REGISTRY_ONLY"),
        "{errors:?}"
    );
    h.quiet().await;
    // A good STATIC one is taken.
    h.write(
        "xs.yaml",
        &doc2("  hosts: [db.example.com]\n  ports: [{number: 5432, name: pg}]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.20, ports: {pg: 6432}}]\n"),
    );
    assert_eq!(
        summary(&h.next().await),
        vec!["apply ExternalService demo/db"]
    );
}

/// A scan of only the paths a watcher reported must end where a full scan of the folder
/// does: the same events from the same state, the same errors.
#[test]
fn a_scan_of_the_changed_paths_agrees_with_a_full_scan() {
    use ambit_controller::source::local::Scanner;
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let at = |name: &str| root.join(name);
    let write = |name: &str, text: &str| std::fs::write(at(name), text).expect("write");
    write("ns.yaml", NS);
    write("a.yaml", &pod("a", "web"));
    write("b.yaml", &pod("bb", "db"));
    let mut partial = Scanner::new(&root);
    let mut full = Scanner::new(&root);
    let first = full.scan();
    assert_eq!(summary(&first.events).len(), 3);
    let none = BTreeSet::new();
    assert_eq!(
        summary(&partial.scan_paths(&none).events),
        summary(&first.events),
        "a first scan reads everything"
    );

    // Each step changes the folder, then names the paths inotify reports for it.
    type Step<'a> = (&'a str, Box<dyn Fn() + 'a>, Vec<&'a str>);
    let steps: Vec<Step> = vec![
        (
            "modify",
            Box::new(|| write("a.yaml", &pod("a", "web2"))),
            vec!["a.yaml"],
        ),
        (
            "create",
            Box::new(|| write("c.yml", &pod("ccc", "x"))),
            vec!["c.yml"],
        ),
        (
            "write then rename",
            Box::new(|| {
                write(".b.yaml.tmp", &pod("bb", "db2"));
                std::fs::rename(at(".b.yaml.tmp"), at("b.yaml")).expect("rename");
            }),
            vec![".b.yaml.tmp", "b.yaml"],
        ),
        (
            "rename",
            Box::new(|| std::fs::rename(at("c.yml"), at("d.json")).expect("rename")),
            vec!["c.yml", "d.json"],
        ),
        (
            "remove",
            Box::new(|| std::fs::remove_file(at("b.yaml")).expect("rm")),
            vec!["b.yaml"],
        ),
        (
            "ignored names",
            Box::new(|| {
                write(".a.yaml.swp", "junk: [");
                write("README.txt", "notes");
            }),
            vec![".a.yaml.swp", "README.txt"],
        ),
        (
            "a new directory",
            Box::new(|| {
                std::fs::create_dir(at("sub")).expect("mkdir");
                write("sub/e.yaml", &pod("eeeee", "e"));
            }),
            vec!["sub"],
        ),
        (
            "a renamed directory",
            Box::new(|| std::fs::rename(at("sub"), at("sub2")).expect("rename")),
            vec!["sub", "sub2"],
        ),
        (
            "a broken file",
            Box::new(|| write("a.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n")),
            vec!["a.yaml"],
        ),
        (
            "another file changes while one is broken",
            Box::new(|| write("d.json", &pod("ccc", "y"))),
            vec!["d.json"],
        ),
        (
            "a namespace goes",
            Box::new(|| std::fs::remove_file(at("ns.yaml")).expect("rm")),
            vec!["ns.yaml"],
        ),
        (
            "it comes back and the broken file is fixed",
            Box::new(|| {
                write("ns.yaml", NS);
                write("a.yaml", &pod("a", "web3"));
            }),
            vec!["ns.yaml", "a.yaml"],
        ),
        (
            "a directory moved out of the folder",
            Box::new(|| std::fs::rename(at("sub2"), outside.path().join("sub2")).expect("mv")),
            vec!["sub2"],
        ),
        (
            "a directory moved in",
            Box::new(|| std::fs::rename(outside.path().join("sub2"), at("sub3")).expect("mv")),
            vec!["sub3"],
        ),
        (
            "a removed directory",
            Box::new(|| std::fs::remove_dir_all(at("sub3")).expect("rm -r")),
            vec!["sub3/e.yaml", "sub3"],
        ),
    ];
    for (what, change, paths) in steps {
        change();
        let paths: BTreeSet<_> = paths.iter().map(|p| at(p)).collect();
        let (p, f) = (partial.scan_paths(&paths), full.scan());
        assert_eq!(summary(&p.events), summary(&f.events), "{what}: events");
        assert_eq!(lines(&p.errors), lines(&f.errors), "{what}: errors");
        // The steps are chosen so that each one is seen (a rename moves an object
        // between files: a scan that missed the old name would report a duplicate).
        assert!(
            !f.events.is_empty()
                || !f.errors.is_empty()
                || ["ignored names", "rename", "a renamed directory"].contains(&what),
            "{what}: the step changed nothing"
        );
    }
}

#[tokio::test]
async fn directories_created_renamed_and_removed_while_watched_are_followed() {
    let mut h = Harness::start(&[("ns.yaml", NS)], Duration::from_secs(3600));
    assert_eq!(
        summary(&h.next().await),
        vec!["apply Namespace demo", "synced"]
    );
    // A file written into a new directory at once, before any watch on it can exist.
    let sub = h.dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::write(sub.join("p.yaml"), pod("a", "web")).expect("write");
    assert_eq!(summary(&h.next().await), vec!["apply Pod demo/a web"]);
    // Renamed: the same objects, nothing to send; then a change under the new name.
    std::fs::rename(&sub, h.dir.path().join("moved")).expect("rename");
    h.quiet().await;
    std::fs::write(h.dir.path().join("moved/p.yaml"), pod("a", "web2")).expect("write");
    assert_eq!(summary(&h.next().await), vec!["apply Pod demo/a web2"]);
    std::fs::remove_dir_all(h.dir.path().join("moved")).expect("rm -r");
    assert_eq!(summary(&h.next().await), vec!["delete Pod demo/a"]);
    assert!(h.errors.borrow().is_empty());
}

#[tokio::test]
async fn reading_the_folder_does_not_start_another_scan() {
    // The scans open every file they read, and the watcher sees those opens: were they
    // taken for changes, each scan would start the next and a quiet folder would be read
    // over and over.
    let files: Vec<(String, String)> = (0..20)
        .map(|i| (format!("p{i}.yaml"), pod(&format!("p{i}"), "web")))
        .chain([("ns.yaml".to_string(), NS.to_string())])
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mut h = Harness::start(&files, Duration::from_secs(3600));
    assert_eq!(summary(&h.next().await).len(), 22);
    h.quiet().await;
    assert_eq!(*h.scans.borrow(), 1, "a quiet folder was scanned again");
    // One write is one scan (two, should the watcher split the write-then-rename across
    // the debounce), and its file is read without the other twenty starting more.
    h.write("p3.yaml", &pod("p3", "db"));
    assert_eq!(summary(&h.next().await), vec!["apply Pod demo/p3 db"]);
    h.quiet().await;
    let scans = *h.scans.borrow();
    assert!((2..=3).contains(&scans), "{scans} scans");
}

/// What the served objects are after a scanner's events, kept across scans as the model
/// keeps them, compared with what a fresh scanner serves from the same folder: the
/// definitions the scanner keeps between scans must end where reading everything again
/// does, with the same duplicates reported, whatever the order of the edits.
#[test]
fn definitions_kept_between_scans_agree_with_a_fresh_scan() {
    use ambit_controller::source::local::Scanner;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    std::fs::write(root.join("ns.yaml"), NS).expect("write");
    let files = ["a.yaml", "b.yaml", "c.yaml", "d.yaml", "sub/e.yaml"];
    std::fs::create_dir(root.join("sub")).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut kept = Scanner::new(&root);
    let mut model: BTreeMap<ObjectKey, String> = BTreeMap::new();
    let apply = |model: &mut BTreeMap<ObjectKey, String>, events: &[SourceEvent]| {
        for e in events {
            match e {
                SourceEvent::Apply(o) => {
                    model.insert(o.key().expect("key"), format!("{o:?}"));
                }
                SourceEvent::Delete(k) => {
                    model.remove(k);
                }
                _ => {}
            }
        }
    };
    apply(&mut model, &kept.scan().events);
    let mut duplicates = 0;
    for step in 0..150 {
        let mut changed = BTreeSet::new();
        for _ in 0..rng.random_range(1..3) {
            let name = files[rng.random_range(0..files.len())];
            let path = root.join(name);
            if rng.random_range(0..5) == 0 {
                let _ = std::fs::remove_file(&path);
            } else {
                // A few pods from a small pool, so files often define the same one, and
                // a file sometimes defines one twice.
                let text: Vec<String> = (0..rng.random_range(0..4))
                    .map(|_| {
                        let n = rng.random_range(0..6);
                        pod(&format!("p{n}"), &format!("v{}", rng.random_range(0..3)))
                    })
                    .collect();
                std::fs::write(&path, text.join("---\n")).expect("write");
            }
            changed.insert(path);
        }
        let scan = kept.scan_paths(&changed);
        apply(&mut model, &scan.events);
        let fresh = Scanner::new(&root).scan();
        let mut want = BTreeMap::new();
        apply(&mut want, &fresh.events);
        assert_eq!(model, want, "step {step}: served objects");
        assert_eq!(
            lines(&scan.errors),
            lines(&fresh.errors),
            "step {step}: errors"
        );
        duplicates += fresh.errors.len();
    }
    assert!(
        duplicates > 50,
        "the steps made too few duplicates: {duplicates}"
    );
}
