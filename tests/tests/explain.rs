//! `ambitctl explain` on a running local mesh, compared with what the proxies actually do.
//! One mesh (the waypoint example: `shop` enrolled, service `api` behind waypoint `waypoint`
//! which denies DELETE), plus a `db` pod whose L4 policy denies the client on port 5432. For
//! each case the test makes the real connection or request from the client pod, then asks
//! explain, and checks that explain's outcome, deciding proxy, policy, rule and field agree
//! with what the client saw and what the deciding proxy logged:
//!
//! - GET through the waypoint: allowed (200), the destination ztunnel allows the waypoint;
//! - TCP to db:5432: denied by `shop/db-deny-client` rule 0 at db's ztunnel, naming
//!   `from[0].source.principals` and `to[0].operation.ports`; db:8080 is allowed, the port
//!   field named as what did not match;
//! - DELETE through the waypoint: 403 from `shop/no-delete` rule 0, `to[0].operation.methods`;
//! - an IPv6 address the mesh does not know: refused by the client's ztunnel.
//!
//! Run under `flock /tmp/ambit-localmesh.lock`: the local mesh's addresses are fixed.

use std::net::SocketAddr;

use ambit_tests::local_mesh::{
    ambitctl, http_echo_in, http_from, http_to, tempfile_dir, wait_for, Mesh,
};
use ambitctl::local::net;
use serde_json::Value;

const WAYPOINT_OBJECTS: &str = include_str!("../../cli/examples/waypoint/shop.yaml");

/// The example, with the client's IPv6 address known to the mesh, a `db` pod guarded by an
/// L4 DENY policy for the client on port 5432, and a route for `/orders` on `api`.
fn objects() -> String {
    let client = "status: {podIP: 10.77.1.2}";
    assert!(WAYPOINT_OBJECTS.contains(client), "the example changed");
    let ip6 = net::pod_ip6(1, 0).expect("IPv6 plan");
    WAYPOINT_OBJECTS.replace(
        client,
        &format!("status: {{podIP: 10.77.1.2, podIPs: [{{ip: 10.77.1.2}}, {{ip: \"{ip6}\"}}]}}"),
    ) + r#"---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node2, serviceAccountName: db, containers: [{name: app, image: app}]}
status: {podIP: 10.77.2.3}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: db-deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {ports: ["5432"]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-orders, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /orders}}]
    backendRefs: [{name: api, port: 80}]
"#
}

/// `ambitctl explain ... -o json`.
fn explain(mesh: &Mesh, args: &[&str]) -> Value {
    let sd = mesh.state_dir.display().to_string();
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    all.extend(["-o", "json", "--state-dir", &sd]);
    let out = ambitctl(&all);
    assert!(
        out.status.success(),
        "ambitctl {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "explain -o json is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The step of `e` named `name`.
fn step<'a>(e: &'a Value, name: &str) -> &'a Value {
    e["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == name))
        .unwrap_or_else(|| panic!("no {name} step in {e:#}"))
}

/// The fields of a policy step as `field=seen matched|unmatched`.
fn fields(step: &Value) -> Vec<String> {
    step["policy"]["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            format!(
                "{} {}={} {}",
                f["policy"].as_str().unwrap_or_default(),
                f["field"].as_str().unwrap_or_default(),
                f["seen"].as_str().unwrap_or_default(),
                if f["matched"] == true {
                    "matched"
                } else {
                    "unmatched"
                }
            )
        })
        .collect()
}

/// Access-log events explain showed for `proxy`.
fn shown_events<'a>(e: &'a Value, proxy: &str) -> Vec<&'a Value> {
    e["access_log"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["proxy"] == proxy)
        .flat_map(|l| l["events"].as_array().into_iter().flatten())
        .collect()
}

#[test]
fn explain_agrees_with_what_the_proxies_do() {
    let dir = tempfile_dir("lm-explain-objects");
    std::fs::write(dir.join("shop.yaml"), objects()).expect("write objects");
    let od = dir.display().to_string();
    let Some(mesh) = Mesh::up_with(
        "explain_agrees_with_what_the_proxies_do",
        "x",
        &["--objects", &od],
    ) else {
        return;
    };
    let [client, api, db] = mesh.pods(["client-0", "api-0", "db-0"]);
    http_echo_in(&api.netns, SocketAddr::from((api.ip, 8080)));
    for port in [5432, 8080] {
        http_echo_in(&db.netns, SocketAddr::from((db.ip, port)));
    }
    let vip: SocketAddr = "10.96.0.30:80".parse().expect("vip");

    // Allowed: a GET through the waypoint (waiting until the waypoint knows the service).
    let last = std::cell::RefCell::new(String::new());
    wait_for(
        30,
        "a GET through the waypoint",
        || {
            let answer = http_from(&client.netns, vip, "GET");
            let ok = answer.starts_with("HTTP/1.1 200");
            *last.borrow_mut() = answer;
            ok
        },
        || {
            format!(
                "last answer: {}\nwaypoint log:\n{}",
                last.borrow(),
                mesh.log("waypoint-shop-waypoint.log")
            )
        },
    );
    // The waypoint writes its access-log line when the response ends.
    wait_for(
        10,
        "the waypoint's access-log line for the GET",
        || {
            mesh.log("waypoint-shop-waypoint.log")
                .contains("\"status\":\"200\"")
        },
        || mesh.log("waypoint-shop-waypoint.log"),
    );
    let e = explain(
        &mesh,
        &[
            "shop/client-0",
            "api.shop:80",
            "--method",
            "GET",
            "--path",
            "/orders/1",
        ],
    );
    assert_eq!(e["outcome"], "allowed", "{e:#}");
    assert_eq!(e["destination"], "10.96.0.30:80", "{e:#}");
    assert_eq!(step(&e, "capture")["outcome"], "pass", "{e:#}");
    let out = step(&e, "outbound");
    assert!(
        out["summary"]
            .as_str()
            .is_some_and(|s| s.contains("to the waypoint") && s.contains("10.77.1.3:15008")),
        "{e:#}"
    );
    let wp = step(&e, "waypoint");
    assert_eq!(wp["outcome"], "pass", "{e:#}");
    assert_eq!(wp["policy"]["allowed"], true, "{e:#}");
    // shop/no-delete was looked at, and its methods field did not match GET.
    assert_eq!(
        fields(wp),
        ["shop/no-delete to[0].operation.methods=GET unmatched"],
        "{e:#}"
    );
    assert_eq!(
        wp["route"], "shop/api-orders (rule 0 of the service's)",
        "{e:#}"
    );
    let inbound = step(&e, "inbound");
    assert_eq!(inbound["outcome"], "allowed", "{e:#}");
    assert_eq!(inbound["proxy"], "ztunnel on node2", "{e:#}");
    // The waypoint logged the 200 for this client, and explain shows it.
    assert!(
        shown_events(&e, "waypoint shop/waypoint")
            .iter()
            .any(|ev| ev["status"] == "200" && ev["method"] == "GET"),
        "{e:#}"
    );

    // Denied at L4: the client's connection to db:5432 is closed without a byte.
    let db5432 = SocketAddr::from((db.ip, 5432));
    let answer = http_from(&client.netns, db5432, "GET");
    assert!(
        !answer.starts_with("HTTP/1.1"),
        "db:5432 answered: {answer}"
    );
    let refused = "denied by shop/db-deny-client (rule 0)";
    wait_for(
        10,
        "node2's access-log line for the refused connection",
        || mesh.log("ztunnel-node2.log").contains(refused),
        || mesh.log("ztunnel-node2.log"),
    );
    let e = explain(&mesh, &["shop/client-0", "shop/db-0:5432"]);
    assert_eq!(e["outcome"], "denied", "{e:#}");
    assert_eq!(e["decided_at"], "inbound (ztunnel on node2)", "{e:#}");
    assert_eq!(e["reason"], refused, "{e:#}");
    let inbound = step(&e, "inbound");
    assert_eq!(inbound["status"], 403, "{e:#}");
    assert_eq!(
        inbound["policy"]["decided_by"]["policy"], "shop/db-deny-client",
        "{e:#}"
    );
    assert_eq!(inbound["policy"]["decided_by"]["rule"], 0, "{e:#}");
    assert_eq!(
        fields(inbound),
        [
            "shop/db-deny-client from[0].source.principals=cluster.local/ns/shop/sa/client matched",
            "shop/db-deny-client to[0].operation.ports=5432 matched",
        ],
        "{e:#}"
    );
    assert!(
        shown_events(&e, "ztunnel on node2")
            .iter()
            .any(|ev| ev["outcome"] == "refused"
                && ev["reason"].as_str().is_some_and(|r| r.ends_with(refused))),
        "{e:#}"
    );
    // The text form names the same rule and fields.
    let sd = mesh.state_dir.display().to_string();
    let text = ambitctl(&[
        "explain",
        "shop/client",
        "shop/db-0:5432",
        "--state-dir",
        &sd,
    ]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    eprintln!("{text}");
    assert!(
        text.contains("[by its service account]")
            && text.contains("policy shop/db-deny-client (DENY) rule 0 matched")
            && text.contains("from[0].source.principals matched"),
        "{text}"
    );
    // The same pod on 8080: the real call gets through, and explain says the port did not match.
    let answer = http_from(&client.netns, SocketAddr::from((db.ip, 8080)), "GET");
    assert!(answer.starts_with("HTTP/1.1 200"), "db:8080: {answer}");
    let e = explain(&mesh, &["shop/client-0", "shop/db-0", "--port", "8080"]);
    assert_eq!(e["outcome"], "allowed", "{e:#}");
    let rules = &step(&e, "inbound")["policy"]["trace"]["policies"][0]["rules"][0];
    assert_eq!(rules["matched"], false, "{e:#}");
    assert_eq!(
        rules["checks"][1]["field"], "to[0].operation.ports",
        "{e:#}"
    );
    assert_eq!(rules["checks"][1]["seen"], "8080", "{e:#}");
    assert_eq!(rules["checks"][1]["matched"], false, "{e:#}");

    // Denied at the waypoint by method.
    let denied = http_from(&client.netns, vip, "DELETE");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    let e = explain(
        &mesh,
        &[
            "shop/client-0",
            "shop/api",
            "--method",
            "DELETE",
            "--path",
            "/orders/1",
        ],
    );
    assert_eq!(e["outcome"], "denied", "{e:#}");
    assert_eq!(
        e["decided_at"], "waypoint (waypoint shop/waypoint)",
        "{e:#}"
    );
    let wp = step(&e, "waypoint");
    assert_eq!(wp["status"], 403, "{e:#}");
    assert!(
        denied.ends_with(&format!(
            "RBAC: access {}\n",
            e["reason"].as_str().unwrap_or("?")
        )),
        "the 403 says {denied:?}, explain says {}",
        e["reason"]
    );
    assert_eq!(
        fields(wp),
        ["shop/no-delete to[0].operation.methods=DELETE matched"],
        "{e:#}"
    );
    assert!(
        !e["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["step"] == "inbound"),
        "a request refused at the waypoint goes no further: {e:#}"
    );

    // No route: a path the service's only route does not take is answered 404 by the
    // waypoint, and explain names the condition that failed.
    let answer = http_to(&client.netns, vip, "GET", "/nope");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let e = explain(
        &mesh,
        &[
            "shop/client-0",
            "api.shop",
            "--method",
            "GET",
            "--path",
            "/nope",
        ],
    );
    assert_eq!(e["outcome"], "refused", "{e:#}");
    let wp = step(&e, "waypoint");
    assert_eq!(wp["status"], 404, "{e:#}");
    assert_eq!(
        wp["route_matches"][0], "rule 0 (shop/api-orders): match 0: path did not match",
        "{e:#}"
    );

    // Refused: an IPv6 address the mesh does not know. The client's ztunnel closes it.
    let unknown: SocketAddr = "[fd77:9::dead]:80".parse().expect("addr");
    let answer = http_from(&client.netns, unknown, "GET");
    assert!(
        !answer.starts_with("HTTP/1.1"),
        "{unknown} answered: {answer}"
    );
    let why = "fd77:9::dead is not an IPv6 address the mesh knows";
    wait_for(
        10,
        "node1's access-log line for the refused connection",
        || mesh.log("ztunnel-node1.log").contains(why),
        || mesh.log("ztunnel-node1.log"),
    );
    let e = explain(&mesh, &["shop/client-0", "[fd77:9::dead]:80"]);
    assert_eq!(e["outcome"], "refused", "{e:#}");
    assert_eq!(e["decided_at"], "outbound (ztunnel on node1)", "{e:#}");
    assert_eq!(
        e["destination_kind"], "an address the mesh does not know",
        "{e:#}"
    );
    assert!(
        e["reason"].as_str().is_some_and(|r| r.contains(why)),
        "{e:#}"
    );
    assert!(
        shown_events(&e, "ztunnel on node1").iter().any(|ev| {
            ev["outcome"] == "refused" && ev["reason"].as_str().is_some_and(|r| r.contains(why))
        }),
        "{e:#}"
    );
    // A name nothing knows is an error that says so.
    let out = ambitctl(&[
        "explain",
        "shop/client-0",
        "nothing.nowhere:80",
        "--state-dir",
        &sd,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("is no service, pod or address the mesh knows"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(mesh);
    let _ = std::fs::remove_dir_all(&dir);
}
