//! Logging set-up, shared by every binary: see [`ambit_runtime::logging`].

pub use ambit_runtime::logging::*;
