#!/usr/bin/env bash
# Runs Ambit's whole test suite the way CI does: formatting, lints, then every test,
# including the end-to-end ones that build real network namespaces and iptables rules
# (so it runs as root).
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
cd "$here/.."

need_root
system_deps
# tests/tests/images.rs builds the container images with buildah.
apt_install buildah
# The smoke run of the side-by-side ztunnel harness (bench/tests/ztunnel_peer.rs) drives these.
apt_install iperf3 sockperf wrk nginx
# The dashboard's browser test (tests/tests/dashboard.rs) drives chromium through chromedriver.
apt_install chromium chromium-driver
rust_toolchain

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries)" >&2
# The end-to-end tests run every binary of the workspace; `cargo test` builds only the
# binaries of packages that have integration tests of their own (not ambit-cni's).
cargo build --workspace --bins --locked
echo "== cargo test" >&2
# Tests that need root fail instead of skipping when CI is set: say we mean it.
export CI="${CI:-true}"
# Network-namespace tests change system state; two threads keep them honest on 2 cores
# without starving the TLS tests of CPU.
cargo test --workspace --locked -- --test-threads="${AMBIT_TEST_THREADS:-2}"
