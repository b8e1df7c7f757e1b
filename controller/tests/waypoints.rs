//! Kubernetes mode: a `Gateway` of class `ambit-waypoint` becomes a waypoint's
//! ServiceAccount, Deployment and Service, server-side applied as `ambit-controller`
//! against an API server speaking the real wire format; other Gateways are left alone.

// Helpers panic as test failures do.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ambit_controller::waypoints::WaypointDeployer;
use ambit_testing::apiserver::{FakeApiServer, Verb};
use serde_json::json;

fn gateway(name: &str, class: &str) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    })
}

#[tokio::test]
async fn waypoint_gateways_are_deployed_with_server_side_apply() {
    let api = FakeApiServer::start().await.unwrap();
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    api.apply(&gateway("waypoint", "ambit-waypoint")).unwrap();
    api.apply(&gateway("ingress", "someone-else")).unwrap();
    let deployer = WaypointDeployer::new(
        api.client().unwrap(),
        "ambit/waypoint:test",
        "cluster.local",
        "https://ambit-controller.ambit-system.svc:15012",
    );
    let task = tokio::spawn(deployer.run());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.get("v1", "Service", "shop", "waypoint").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waypoint never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deployment = api
        .get("apps/v1", "Deployment", "shop", "waypoint")
        .expect("Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "ambit/waypoint:test");
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["name"], "waypoint",
        "owned by its Gateway"
    );
    assert!(api
        .get("v1", "ServiceAccount", "shop", "waypoint")
        .is_some());
    for plural in ["serviceaccounts", "deployments", "services"] {
        let applied = api.requests().iter().any(|r| {
            r.verb == Verb::Patch
                && r.path.ends_with(&format!("/{plural}/waypoint"))
                && r.param("fieldManager") == Some("ambit-controller")
        });
        assert!(applied, "{plural} applied by ambit-controller");
    }
    // A Gateway of another class gets nothing.
    assert!(api
        .get("apps/v1", "Deployment", "shop", "ingress")
        .is_none());
    task.abort();
}

#[tokio::test]
async fn the_fake_api_server_writes_only_status_through_the_status_subresource() {
    use ambit_controller::crd::Gateway;
    use kube::api::{Api, Patch, PatchParams};

    // The deployer reports a waypoint's address through the status subresource; the fake
    // server must keep spec out of such a write, as a real one does.
    let server = FakeApiServer::start().await.expect("start");
    server
        .apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}))
        .expect("namespace");
    server
        .apply(&json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "a"},
            "spec": {"gatewayClassName": "ambit-waypoint"},
        }))
        .expect("gateway");
    let gateways: Api<Gateway> = Api::namespaced(server.client().expect("client"), "a");
    let patch = json!({
        "spec": {"gatewayClassName": "changed"},
        "status": {"addresses": [{"type": "IPAddress", "value": "10.96.0.99"}]},
    });
    let patched = gateways
        .patch_status("waypoint", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch status");
    assert_eq!(
        patched.spec.gateway_class_name, "ambit-waypoint",
        "spec is not writable here"
    );
    let addresses = patched.status.map(|s| s.addresses).unwrap_or_default();
    assert_eq!(
        addresses.first().map(|a| a.value.as_str()),
        Some("10.96.0.99")
    );
    assert_eq!(patched.metadata.generation, Some(1));
    let got = gateways.get_status("waypoint").await.expect("get status");
    assert!(got.status.is_some());
}
