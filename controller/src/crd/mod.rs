//! Ambit's custom resources and the Gateway API types it reads, as Rust types.
//!
//! These types are the single source of truth for three things: what the local source
//! accepts from YAML, what a Kubernetes source will watch, and the CRD schemas rendered
//! into `manifests/` (doc comments become OpenAPI descriptions). That is why fields are
//! typed as tightly as the API allows (enums for actions and match types) while unknown
//! fields are tolerated: an API server prunes them anyway, and a newer manifest must not
//! break an older controller.

pub mod external;
pub mod gateway;
pub mod peer_auth;
pub mod request_authn;
pub mod security;
pub mod traffic;

pub use external::ExternalService;
pub use gateway::{Gateway, GrpcRoute, HttpRoute};
pub use peer_auth::PeerAuthentication;
pub use request_authn::RequestAuthentication;
pub use security::AuthorizationPolicy;
pub use traffic::TrafficPolicy;
