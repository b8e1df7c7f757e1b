//! The connection to the controller (discovery and CA), shared with the waypoint: see
//! [`ambit_runtime::control`].

pub use ambit_runtime::control::*;
