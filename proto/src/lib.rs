//! Ambit's wire contracts, generated from `proto/` at build time.
//!
//! This crate holds only generated code and the few helpers that make it easier to use;
//! conversion into domain types happens at the edge of each consumer (`TryFrom` in the
//! proxies and the controller), not here.

#![allow(clippy::all)]

pub mod discovery {
    tonic::include_proto!("ambit.discovery.v1");
}

pub mod ca {
    tonic::include_proto!("ambit.ca.v1");
}
