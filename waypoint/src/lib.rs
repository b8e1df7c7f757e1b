//! Ambit's L7 proxy: terminates HBONE for the namespaces or services that opt in, applies L7 policy and routing.
