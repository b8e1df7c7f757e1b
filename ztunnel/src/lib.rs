//! Ambit's node proxy: captures enrolled pods' traffic and carries it between nodes over HBONE, enforcing L4 policy.

pub mod access_log;
pub mod admin;
pub mod capture;
pub mod certs;
pub mod decision;
pub mod discovery;
pub mod drain;
pub mod http_server;
pub mod metrics;
pub mod readiness;
pub mod state;
pub mod telemetry;
