//! `ambitctl check --kubernetes`: an installed cluster, read through its API server with the
//! operator's kubeconfig. What the API server knows is checked here: the CRDs are served
//! (discovery lists them, as `kubectl` and the controller's watches need), the controller's
//! Deployment has ready replicas, every node runs a ready ztunnel pod whose workload
//! certificates (its admin `/certs`, through a port-forward) are far from expiry, each Gateway of class
//! `ambit-waypoint` has a ready waypoint Deployment and no `Programmed=False` condition, and
//! the trust root the controller publishes (ConfigMap `ambit-root-cert`) has more than a
//! quarter of its lifetime left.

use std::path::Path;
use std::time::Duration;

use ambit_manifests::{ROOT_CERT_CONFIGMAP, WAYPOINT_CLASS};
use ambitctl::local::cluster::ZTUNNEL_ADMIN_PORT;
use anyhow::Context;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::Client;
use serde_json::Value;

use super::certs::{self, Health};
use super::report::{Check, Report};

const CONTROLLER: &str = "ambit-controller";
const ZTUNNEL: &str = "ambit-ztunnel";
const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";
const CRDS_FIX: &str = "apply the CRDs: `kubectl apply -f manifests/install/01-crds.yaml` (or `ambitctl crds | kubectl apply -f -`; `ambitctl install | kubectl apply -f -` installs them with the rest)";

pub fn run(kubeconfig: Option<&Path>, namespace: &str) -> anyhow::Result<Report> {
    crate::cluster::runtime()?.block_on(check(kubeconfig, namespace))
}

async fn check(kubeconfig: Option<&Path>, ns: &str) -> anyhow::Result<Report> {
    let client = crate::cluster::client(kubeconfig).await?;
    let version = client.apiserver_version().await.context(
        "asking the API server for its version (is the kubeconfig's cluster reachable?)",
    )?;
    let target = format!(
        "cluster (Kubernetes {}.{}, Ambit in namespace {ns}): post-install checks",
        version.major, version.minor
    );
    let mut checks = crds(&client).await;
    let gateway_api = gateway_api(&client).await;
    checks.push(gateway_api.0.clone());
    checks.push(controller(&client, ns).await);
    checks.extend(ztunnels(&client, ns).await);
    if gateway_api.1 {
        checks.extend(waypoints(&client).await);
    }
    checks.push(root_cert(&client, ns).await);
    Ok(Report { target, checks })
}

/// The resources an API group version serves, or why it cannot be listed.
async fn served(client: &Client, api_version: &str) -> Result<Vec<String>, String> {
    client
        .list_api_group_resources(api_version)
        .await
        .map(|l| l.resources.into_iter().map(|r| r.name).collect())
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => format!("{api_version} is not served"),
            other => format!("listing {api_version}: {other}"),
        })
}

/// Every Ambit CRD, as discovery lists it.
async fn crds(client: &Client) -> Vec<Check> {
    let mut out = Vec::new();
    for crd in ambit_manifests::crds::all_values() {
        let text = |p: &str| {
            crd.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        let (group, plural) = (text("/spec/group"), text("/spec/names/plural"));
        let versions: Vec<String> = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect();
        let name = format!("CRD {plural}.{group}");
        let mut missing = Vec::new();
        for v in &versions {
            match served(client, &format!("{group}/{v}")).await {
                Ok(list) if list.contains(&plural) => {}
                Ok(_) => missing.push(format!("{group}/{v} does not list {plural}")),
                Err(why) => missing.push(why),
            }
        }
        out.push(if missing.is_empty() {
            Check::ok(name, format!("served ({})", versions.join(", ")))
        } else {
            Check::fail(
                name,
                format!("not served: {}", missing.join("; ")),
                CRDS_FIX,
            )
        });
    }
    out
}

/// Whether the Gateway API is served (waypoints need it); the check and the answer.
async fn gateway_api(client: &Client) -> (Check, bool) {
    let name = "Gateway API";
    match served(client, GATEWAY_API).await {
        Ok(list) if list.iter().any(|r| r == "gateways") => (
            Check::ok(name, format!("{GATEWAY_API} gateways served")),
            true,
        ),
        Ok(_) | Err(_) => (
            Check::warn(
                name,
                format!("{GATEWAY_API} gateways not served: waypoints and HTTPRoute/GRPCRoute routing are unavailable"),
                "to use waypoints, install the upstream Gateway API CRDs (standard channel), then `ambitctl install --enable-waypoints | kubectl apply -f -`",
            ),
            false,
        ),
    }
}

fn condition(status: &Value, kind: &str) -> Option<(String, String)> {
    status["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"] == kind).then(|| {
            (
                c["status"].as_str().unwrap_or("?").to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
    })
}

/// A Deployment's ready replicas against its wanted ones, or why it is unusable.
async fn deployment(client: &Client, ns: &str, name: &str) -> Result<(i32, i32), String> {
    match Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(d)) => {
            let want = d.spec.replicas.unwrap_or(1);
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            Ok((ready, want))
        }
        Ok(None) => Err(format!("Deployment {ns}/{name} does not exist")),
        Err(e) => Err(format!("reading Deployment {ns}/{name}: {e}")),
    }
}

async fn controller(client: &Client, ns: &str) -> Check {
    let name = "controller";
    match deployment(client, ns, CONTROLLER).await {
        Ok((ready, want)) if ready > 0 => {
            Check::ok(name, format!("Deployment {ns}/{CONTROLLER}: {ready}/{want} replicas ready"))
        }
        Ok((ready, want)) => Check::fail(
            name,
            format!("Deployment {ns}/{CONTROLLER}: {ready}/{want} replicas ready: no discovery, no certificates"),
            format!("`kubectl -n {ns} describe deployment {CONTROLLER}` (scheduling, image pulls), then `kubectl -n {ns} logs deployment/{CONTROLLER}`: readiness (/healthz/ready on 15014) waits for the first sync of every watched kind"),
        ),
        Err(why) => Check::fail(
            name,
            why,
            format!("install Ambit: `ambitctl install | kubectl apply -f -` (or `kubectl apply -f manifests/install/`), with --namespace if not {}", ambit_manifests::DEFAULT_NAMESPACE),
        ),
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Every node has a ready ztunnel pod.
async fn ztunnels(client: &Client, ns: &str) -> Vec<Check> {
    let ds = Api::<DaemonSet>::namespaced(client.clone(), ns)
        .get_opt(ZTUNNEL)
        .await;
    match ds {
        Ok(Some(_)) => {}
        Ok(None) => {
            return vec![Check::fail(
                "ztunnel",
                format!("DaemonSet {ns}/{ZTUNNEL} does not exist"),
                "install Ambit: `ambitctl install | kubectl apply -f -`",
            )]
        }
        Err(e) => {
            return vec![Check::fail(
                "ztunnel",
                format!("reading DaemonSet {ns}/{ZTUNNEL}: {e}"),
                "check your access to the namespace",
            )]
        }
    }
    let nodes = match Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(n) => n.items,
        Err(e) => {
            return vec![Check::fail(
                "ztunnel",
                format!("listing nodes: {e}"),
                "check your access to nodes",
            )]
        }
    };
    let selector = format!("app.kubernetes.io/name={ZTUNNEL}");
    let pods = match Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(p) => p.items,
        Err(e) => {
            return vec![Check::fail(
                "ztunnel",
                format!("listing pods {selector}: {e}"),
                "check your access to the namespace",
            )]
        }
    };
    let mut out = Vec::new();
    for node in nodes {
        let node_name = node.metadata.name.unwrap_or_default();
        let name = format!("ztunnel on {node_name}");
        let on_node: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node_name))
            .collect();
        let pod_name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
        let ready = on_node.iter().find(|p| pod_ready(p));
        if let Some(p) = ready {
            out.push(Check::ok(name, format!("pod {ns}/{} ready", pod_name(p))));
            out.extend(certificates(client, ns, &node_name, &pod_name(p)).await);
            continue;
        }
        out.push(if on_node.is_empty() {
            Check::fail(
                name,
                format!("no ztunnel pod on {node_name}: its enrolled pods are refused"),
                format!("`kubectl -n {ns} describe daemonset {ZTUNNEL}`: the node's taints need a toleration, or the pod cannot be created"),
            )
        } else {
                let names: Vec<String> = on_node.iter().map(|p| pod_name(p)).collect();
                Check::fail(
                    name,
                    format!("pod {ns}/{} not ready", names.join(", ")),
                    format!("`kubectl -n {ns} logs {} -c ztunnel` (readiness on 15021 says what it waits for); `kubectl -n {ns} describe pod {}`", names[0], names[0]),
                )
        });
    }
    out
}

/// The workload certificates a ztunnel pod holds, read from its admin port (15000, on the
/// pod's loopback) through a port-forward, against the quarter-of-lifetime rule.
async fn certificates(client: &Client, ns: &str, node: &str, pod: &str) -> Vec<Check> {
    let name = format!("certificates on {node}");
    let fix = format!("the pods/portforward permission is needed to read ztunnel's admin port; `kubectl -n {ns} port-forward pod/{pod} 15000` then `curl localhost:15000/certs` shows what it holds");
    let body = match crate::cluster::get(client, ns, pod, ZTUNNEL_ADMIN_PORT, "/certs").await {
        Ok((200, body)) => body,
        Ok((status, body)) => {
            return vec![Check::fail(
                name,
                format!("/certs of {ns}/{pod}: HTTP {status}: {}", body.trim()),
                fix,
            )]
        }
        Err(e) => {
            return vec![Check::fail(
                name,
                format!("cannot read /certs of {ns}/{pod}: {e:#}"),
                fix,
            )]
        }
    };
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    json["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| certs::certificate(node, c))
        .collect()
}

/// Each Gateway of class `ambit-waypoint` has a ready waypoint.
async fn waypoints(client: &Client) -> Vec<Check> {
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "gateways");
    let gateways = match Api::<DynamicObject>::all_with(client.clone(), &ar)
        .list(&ListParams::default())
        .await
    {
        Ok(l) => l.items,
        Err(e) => {
            return vec![Check::fail(
                "waypoints",
                format!("listing Gateways: {e}"),
                "check your access to Gateways",
            )]
        }
    };
    let mut out = Vec::new();
    for gw in gateways {
        if gw.data["spec"]["gatewayClassName"] != WAYPOINT_CLASS {
            continue;
        }
        let ns = gw.metadata.namespace.clone().unwrap_or_default();
        let gname = gw.metadata.name.clone().unwrap_or_default();
        let name = format!("waypoint {ns}/{gname}");
        if let Some((status, message)) = condition(&gw.data["status"], "Programmed") {
            if status == "False" {
                out.push(Check::fail(
                    name,
                    format!("Gateway says Programmed=False: {message}"),
                    format!("`kubectl -n {ns} describe gateway {gname}` and the controller's log"),
                ));
                continue;
            }
        }
        out.push(match deployment(client, &ns, &gname).await {
            Ok((ready, want)) if ready > 0 => Check::ok(name, format!("Deployment {ns}/{gname}: {ready}/{want} replicas ready")),
            Ok((ready, want)) => Check::fail(
                name,
                format!("Deployment {ns}/{gname}: {ready}/{want} replicas ready: traffic through it is refused"),
                format!("`kubectl -n {ns} describe deployment {gname}`, then `kubectl -n {ns} logs deployment/{gname}`"),
            ),
            Err(why) => Check::fail(
                name,
                format!("{why}: the controller has not deployed it"),
                "the controller deploys waypoints once installed with `--enable-waypoints` (GatewayClass ambit-waypoint and its RBAC); read the controller's log",
            ),
        });
    }
    if out.is_empty() {
        out.push(Check::ok(
            "waypoints",
            format!("no Gateway of class {WAYPOINT_CLASS}"),
        ));
    }
    out
}

/// The trust root the controller publishes, against the quarter-of-lifetime rule.
async fn root_cert(client: &Client, ns: &str) -> Check {
    let name = format!("trust root ({ns}/{ROOT_CERT_CONFIGMAP})");
    let cm = match Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(ROOT_CERT_CONFIGMAP).await {
        Ok(Some(cm)) => cm,
        Ok(None) => {
            return Check::fail(
                name,
                "ConfigMap does not exist: proxies cannot verify any peer",
                format!("the controller publishes it once its CA is loaded: `kubectl -n {ns} logs deployment/{CONTROLLER}`"),
            )
        }
        Err(e) => return Check::fail(name, format!("reading it: {e}"), "check your access to the namespace"),
    };
    let pem = cm
        .data
        .and_then(|d| d.get("root-cert.pem").cloned())
        .unwrap_or_default();
    match validity(&pem) {
        Some((lifetime, left)) => {
            let detail = format!("expires in {} of a {} lifetime", certs::human(left), certs::human(lifetime));
            match certs::health(left, lifetime) {
                Health::Fresh => Check::ok(name, detail),
                Health::Expiring | Health::Expired => Check::fail(
                    name,
                    format!("{detail}: less than a quarter left"),
                    "plan a root rotation: a new CA (`ambitctl install --ca-cert/--ca-key`) trusted beside the old one before the old expires",
                ),
            }
        }
        None => Check::fail(
            name,
            "root-cert.pem is missing or not a PEM certificate",
            "let the controller re-publish it (delete the ConfigMap; it is recreated from the CA Secret)",
        ),
    }
}

/// (lifetime, time left) of the first certificate in `pem`.
fn validity(pem: &str) -> Option<(Duration, Duration)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs(),
    )
    .ok()?;
    let secs = |s: i64| Duration::from_secs(u64::try_from(s.max(0)).unwrap_or(0));
    Some((secs(na - nb), secs(na - now)))
}
