//! The Kubernetes objects the model understands, as one closed enum, and their keys.
//!
//! Every source (the YAML folder, a Kubernetes watcher) hands the model these same
//! values, so dispatch on `apiVersion`/`kind` lives here once.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::pod::MeshPod;
use crate::crd::{
    AuthorizationPolicy, ExternalService, Gateway, GrpcRoute, HttpRoute, PeerAuthentication,
    RequestAuthentication, TrafficPolicy,
};

/// The namespace objects land in when their metadata names none, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

macro_rules! objects {
    ($($variant:ident($ty:ty) = $api:literal, $kind:literal, namespaced: $ns:literal;)*) => {
        /// The kinds of object the model holds.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Kind {
            $(
                #[doc = concat!("`", $api, "` `", $kind, "`.")]
                $variant,
            )*
        }

        /// One Kubernetes object of a kind the model understands.
        // Every object of the model is as large as the largest variant, so a kind much
        // larger than the others is boxed (a `Node`, 1.5 KB of status), and a pod is kept
        // as the fields the mesh reads (see `MeshPod`). The rest stay unboxed, so sources
        // write `Object::Service` as a constructor.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Object {
            $(
                #[doc = concat!("A `", $kind, "`.")]
                $variant($ty),
            )*
        }

        impl Kind {
            /// Every kind, in a stable order.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),*];

            /// The `apiVersion` objects of this kind carry.
            pub fn api_version(self) -> &'static str {
                match self { $(Kind::$variant => $api,)* }
            }

            /// The `kind` field of objects of this kind.
            pub fn name(self) -> &'static str {
                match self { $(Kind::$variant => $kind,)* }
            }

            /// Whether objects of this kind live in a namespace.
            pub fn namespaced(self) -> bool {
                match self { $(Kind::$variant => $ns,)* }
            }

            /// The kind named by an object's `apiVersion` and `kind`, if we know it.
            pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
                match (api_version, kind) {
                    $(($api, $kind) => Some(Kind::$variant),)*
                    _ => None,
                }
            }

            /// Deserialises one document as an object of this kind. With a serde_yaml
            /// document deserializer the error keeps the line and column.
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(self, d: D) -> Result<Object, D::Error> {
                use serde::Deserialize as _;
                match self {
                    $(Kind::$variant => <$ty>::deserialize(d).map(Object::$variant),)*
                }
            }
        }

        impl Object {
            /// The object's kind.
            pub fn kind(&self) -> Kind {
                match self { $(Object::$variant(_) => Kind::$variant,)* }
            }

            /// The object's metadata.
            pub fn metadata(&self) -> &ObjectMeta {
                match self { $(Object::$variant(o) => &o.metadata,)* }
            }

            /// Mutable metadata, for sources that normalise it (e.g. the namespace default).
            pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self { $(Object::$variant(o) => &mut o.metadata,)* }
            }
        }
    };
}

objects! {
    Namespace(Namespace) = "v1", "Namespace", namespaced: false;
    Node(Box<Node>) = "v1", "Node", namespaced: false;
    ServiceAccount(ServiceAccount) = "v1", "ServiceAccount", namespaced: true;
    Pod(MeshPod) = "v1", "Pod", namespaced: true;
    Service(Service) = "v1", "Service", namespaced: true;
    EndpointSlice(EndpointSlice) = "discovery.k8s.io/v1", "EndpointSlice", namespaced: true;
    Gateway(Gateway) = "gateway.networking.k8s.io/v1", "Gateway", namespaced: true;
    HttpRoute(HttpRoute) = "gateway.networking.k8s.io/v1", "HTTPRoute", namespaced: true;
    GrpcRoute(GrpcRoute) = "gateway.networking.k8s.io/v1", "GRPCRoute", namespaced: true;
    AuthorizationPolicy(AuthorizationPolicy) = "security.ambit.dev/v1", "AuthorizationPolicy", namespaced: true;
    TrafficPolicy(TrafficPolicy) = "traffic.ambit.dev/v1", "TrafficPolicy", namespaced: true;
    PeerAuthentication(PeerAuthentication) = "security.ambit.dev/v1", "PeerAuthentication", namespaced: true;
    RequestAuthentication(RequestAuthentication) = "security.ambit.dev/v1", "RequestAuthentication", namespaced: true;
    ExternalService(ExternalService) = "networking.ambit.dev/v1", "ExternalService", namespaced: true;
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifies one object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// Builds a key; the namespace is dropped for cluster-scoped kinds.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        let namespace = if kind.namespaced() {
            namespace.to_string()
        } else {
            String::new()
        };
        ObjectKey {
            kind,
            namespace,
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    /// The object's key, or `None` when it has no name (sources reject those).
    /// A namespaced object without a namespace is keyed in [`DEFAULT_NAMESPACE`].
    pub fn key(&self) -> Option<ObjectKey> {
        let meta = self.metadata();
        let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
        let namespace = meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
        Some(ObjectKey::new(self.kind(), namespace, name))
    }
}
