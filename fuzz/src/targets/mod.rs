//! The fuzz targets, one module each (see the crate documentation for how they run).

mod capsule;
mod csr;
mod discovery;
mod dns;
mod hbone;
mod policy;
mod static_state;
mod yaml_prescan;
