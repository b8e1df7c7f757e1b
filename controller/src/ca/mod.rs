//! The controller's certificate authority: who may ask ([`auth`]), for what ([`authz`]),
//! where the root lives ([`store`], [`kube_store`]), the gRPC service that signs ([`service`]), and the
//! controller's own certificate for 15012 ([`serving`]), all assembled by [`setup`].
//!
//! The signing itself is `ambit_hbone::ca`; this module adds what makes it safe to expose
//! on the network: authentication, authorization against the model, and accounting.

pub mod auth;
pub mod authz;
pub mod kube_store;
pub mod service;
pub mod serving;
pub mod setup;
pub mod store;

pub use auth::{AuthError, Authenticator, Caller, LocalCredentials, TokenReviewer};
pub use service::{CaMetrics, CaService};
pub use setup::{AuthConfig, Security, SecurityConfig};
