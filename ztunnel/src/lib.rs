//! Ambit's node proxy: captures enrolled pods' traffic and carries it between nodes over HBONE, enforcing L4 policy.
//!
//! [`app::App`] assembles the pieces; `ARCHITECTURE.md` explains the threads, ports and the
//! path of one connection. Not for: L7 (that is the waypoint's job), talking to Kubernetes
//! (the controller's).

pub mod access_log;
pub mod admin;
pub mod app;
pub mod capture;
pub mod certs;
pub mod cni;
pub mod config;
pub mod control;
pub mod decision;
pub mod discovery;
pub mod dns;
pub mod drain;
pub mod enrollment;
pub mod handover;
pub mod http_server;
pub mod limits;
pub mod metrics;
pub mod node_dir;
pub mod peer;
pub mod proxy;
pub mod readiness;
pub mod state;
pub mod telemetry;
