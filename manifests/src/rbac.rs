//! Who may do what: the controller's and ztunnel's ServiceAccounts and the controller's roles.
//!
//! Least privilege, and each rule says why it exists:
//! - the controller reads the objects its model is made of, and creates `TokenReview`s to check the
//!   tokens proxies present to the CA. Cluster-wide it writes nothing in the core install.
//! - with waypoints enabled, a second ClusterRole lets it create and patch (server-side apply needs
//!   both) the Deployment, Service and ServiceAccount of each waypoint, in whatever namespace the
//!   `Gateway` is, and report on the `Gateway` and its class. That is a strong permission (a
//!   Deployment can run as any ServiceAccount of its namespace), hence its own role: an operator who
//!   wants waypoints only in some namespaces can bind this ClusterRole there with RoleBindings
//!   instead of the ClusterRoleBinding. Deletion is left to the garbage collector (the objects are
//!   owned by their `Gateway`), so no `delete` verb.
//! - in its own namespace only, a Role lets the controller keep the CA: read the `ambit-ca` Secret
//!   (a plugged-in root, or the one it generated and stored there so a restart keeps it) and
//!   publish the trust root in the `ambit-root-cert` ConfigMap that proxies mount. `get`/`patch`
//!   are limited to those names; `create` cannot be limited by name in RBAC, but it is only
//!   granted in this namespace, which holds nothing else.
//! - ztunnel has no permission at all: it only talks to the controller, and its token is not even
//!   mounted; it gets a projected token for the `ambit-ca` audience instead (see [`crate::ztunnel`]).
//! - in the same namespace, the replicas elect their leader with the `ambit-controller` Lease:
//!   `get`/`update` on that name only, and `create` (the first replica creates it).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};

use crate::{controller, meta, ztunnel, InstallOptions, Object};

/// Name of the controller's read-only ClusterRole (and its binding).
pub const CONTROLLER_ROLE: &str = "ambit-controller";
/// Name of the controller's Role in its own namespace (and its binding).
pub const CA_ROLE: &str = "ambit-controller-ca";
/// Name of the ClusterRole that lets the controller deploy waypoints (and its binding).
pub const WAYPOINT_ROLE: &str = "ambit-controller-waypoints";

const READ: &[&str] = &["get", "list", "watch"];

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// The controller's rules in every install.
pub fn controller_rules() -> Vec<PolicyRule> {
    vec![
        // The model: workloads, services and the identities they run as; nodes so the CA can tie a
        // ztunnel's token to the node it runs on (and the pods it may ask certificates for).
        rule(
            "",
            &["namespaces", "pods", "services", "serviceaccounts", "nodes"],
            READ,
        ),
        rule("discovery.k8s.io", &["endpointslices"], READ),
        // Policy: Ambit's own CRDs.
        rule(
            "security.ambit.dev",
            &[
                "authorizationpolicies",
                "peerauthentications",
                "requestauthentications",
            ],
            READ,
        ),
        rule("traffic.ambit.dev", &["trafficpolicies"], READ),
        rule("networking.ambit.dev", &["externalservices"], READ),
        // Routing (GAMMA) and waypoint declarations. Harmless where the Gateway API CRDs are absent.
        rule(
            "gateway.networking.k8s.io",
            &["gateways", "httproutes", "grpcroutes"],
            READ,
        ),
        // The CA authenticates proxies' projected tokens.
        rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
    ]
}

/// The controller's rules in its own namespace: the CA Secret, the trust-root ConfigMap and
/// the leader election's Lease.
pub fn ca_rules() -> Vec<PolicyRule> {
    let named = |resource: &str, name: &str, verbs: &[&str]| PolicyRule {
        resource_names: Some(vec![name.to_owned()]),
        ..rule("", &[resource], verbs)
    };
    vec![
        // Created once (generated root), then only read.
        rule("", &["secrets"], &["create"]),
        named("secrets", controller::CA_SECRET, &["get"]),
        // Written with server-side apply: CREATE the first time, PATCH after.
        rule("", &["configmaps"], &["create"]),
        named("configmaps", crate::ROOT_CERT_CONFIGMAP, &["get", "patch"]),
        // Leader election among the replicas: created by the first, then read and renewed
        // (a replace guarded by its resourceVersion).
        rule("coordination.k8s.io", &["leases"], &["create"]),
        PolicyRule {
            resource_names: Some(vec![controller::LEASE.to_owned()]),
            ..rule("coordination.k8s.io", &["leases"], &["get", "update"])
        },
    ]
}

/// The extra rules for running waypoints.
pub fn waypoint_rules() -> Vec<PolicyRule> {
    vec![
        // Each waypoint is a Deployment + Service + its own ServiceAccount (its identity), written
        // with server-side apply: PATCH, plus CREATE for the first apply.
        rule("apps", &["deployments"], &["create", "patch"]),
        rule("", &["services", "serviceaccounts"], &["create", "patch"]),
        // Report Accepted/Programmed on the Gateway, and Accepted on our GatewayClass (which the
        // controller must read to know it is ours).
        rule(
            "gateway.networking.k8s.io",
            &["gateways/status"],
            &["patch"],
        ),
        rule("gateway.networking.k8s.io", &["gatewayclasses"], READ),
        rule(
            "gateway.networking.k8s.io",
            &["gatewayclasses/status"],
            &["patch"],
        ),
    ]
}

fn binding(name: &str, opts: &InstallOptions) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta::cluster_meta(name, controller::NAME),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "ClusterRole".to_owned(),
            name: name.to_owned(),
        },
        subjects: Some(vec![controller_subject(opts)]),
    }
}

fn controller_subject(opts: &InstallOptions) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: controller::NAME.to_owned(),
        namespace: Some(opts.namespace.clone()),
        ..Subject::default()
    }
}

/// ServiceAccounts, the controller's ClusterRole and its binding.
pub fn objects(opts: &InstallOptions) -> Vec<Object> {
    vec![
        Object::ServiceAccount(ServiceAccount {
            metadata: meta::namespaced_meta(controller::NAME, &opts.namespace, controller::NAME),
            ..ServiceAccount::default()
        }),
        Object::ServiceAccount(ServiceAccount {
            metadata: meta::namespaced_meta(ztunnel::NAME, &opts.namespace, ztunnel::NAME),
            // Nothing in ztunnel talks to the API server; not mounting the token means a
            // compromised ztunnel has no API credential at all.
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        }),
        Object::ClusterRole(ClusterRole {
            metadata: meta::cluster_meta(CONTROLLER_ROLE, controller::NAME),
            rules: Some(controller_rules()),
            ..ClusterRole::default()
        }),
        Object::ClusterRoleBinding(binding(CONTROLLER_ROLE, opts)),
        Object::Role(Role {
            metadata: meta::namespaced_meta(CA_ROLE, &opts.namespace, controller::NAME),
            rules: Some(ca_rules()),
        }),
        Object::RoleBinding(RoleBinding {
            metadata: meta::namespaced_meta(CA_ROLE, &opts.namespace, controller::NAME),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".to_owned()),
                kind: "Role".to_owned(),
                name: CA_ROLE.to_owned(),
            },
            subjects: Some(vec![controller_subject(opts)]),
        }),
    ]
}

/// The waypoint ClusterRole and its binding (only with `--enable-waypoints`).
pub fn waypoint_objects(opts: &InstallOptions) -> Vec<Object> {
    vec![
        Object::ClusterRole(ClusterRole {
            metadata: meta::cluster_meta(WAYPOINT_ROLE, controller::NAME),
            rules: Some(waypoint_rules()),
            ..ClusterRole::default()
        }),
        Object::ClusterRoleBinding(binding(WAYPOINT_ROLE, opts)),
    ]
}
