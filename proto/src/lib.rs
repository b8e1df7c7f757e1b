//! Ambit's wire contracts, generated from `proto/` at build time.
//!
//! This crate holds only generated code and the few helpers that make it easier to use;
//! conversion into domain types happens at the edge of each consumer (`TryFrom` in the
//! proxies and the controller), not here. The contract's well-known ports and default trust
//! domain are defined here too ([`ports`], [`DEFAULT_TRUST_DOMAIN`]), once for every crate.

#![allow(clippy::all)]

pub mod discovery {
    tonic::include_proto!("ambit.discovery.v1");
}

pub mod ca {
    tonic::include_proto!("ambit.ca.v1");
}

mod defaults;
pub use defaults::{ports, DEFAULT_TRUST_DOMAIN};

/// Decodes a raw address as the contract carries it (4 bytes IPv4, 16 bytes IPv6); `Err` holds
/// the length of anything else. An IPv4-mapped IPv6 address comes back as the IPv4 address, the
/// one spelling every proxy indexes and matches by, so the same endpoint never has two keys.
pub fn ip_from_bytes(bytes: &[u8]) -> Result<std::net::IpAddr, usize> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(std::net::IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes)
        .map(|v6| std::net::IpAddr::from(v6).to_canonical())
        .map_err(|_| bytes.len())
}
