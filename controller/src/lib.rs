//! Ambit's control plane: watches Kubernetes or a folder of YAML, pushes state to proxies and signs workload certificates.
