#!/usr/bin/env bash
# Benchmarks Ambit (root, Debian). Two benchmarks, chosen by the arguments:
#
#   scripts/bench.sh [--quick]
#     The local mesh: installs the reference proxy (haproxy) and the tools the bench drives,
#     builds release binaries, then runs target/release/local_mesh, which brings up a mesh
#     with `ambitctl up --detach`, measures direct TCP, the mesh and haproxy's mTLS tunnel
#     between pods on the same node and across nodes, prints one table per placement and
#     always tears the mesh down.
#
#   scripts/bench.sh --peer-ztunnel PATH [--rounds N] [--seconds S] ...
#   scripts/bench.sh ztunnel [...]            (the same without a peer)
#     Ambit's ztunnel side by side with another ztunnel binary (e.g. Istio's, built from its
#     source with `cargo build --release --features testing`): installs iperf3, sockperf, wrk
#     and nginx, builds release binaries and runs target/release/ztunnel_peer, which measures
#     direct, a byte relay that bounds any proxy (the floor), Ambit and the peer on two
#     namespaces joined by a veth pair, in alternating order for several rounds, and prints
#     medians, spreads and ratios with the machine's load.
#
# Other arguments are passed on to the benchmark.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
cd "$here/.."

need_root
system_deps

side_by_side=false
if [ "${1:-}" = ztunnel ]; then
  side_by_side=true
  shift
fi
for arg in "$@"; do
  case "$arg" in --peer-ztunnel|--peer-ztunnel=*) side_by_side=true;; esac
done

if $side_by_side; then
  apt_install iperf3 sockperf wrk nginx
  rust_toolchain
  echo "ambit: building (release)" >&2
  cargo build --release --locked -p ambit-ztunnel -p ambit-bench --bin ztunnel --bin ztunnel_peer --bin floor_relay
  echo "ambit: load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  exec target/release/ztunnel_peer "$@"
fi

# haproxy: the reference tunnel; openssl: its throw-away certificates.
apt_install haproxy openssl
rust_toolchain

echo "ambit: building (release)" >&2
cargo build --release --locked -p ambitctl -p ambit-controller -p ambit-ztunnel -p ambit-waypoint -p ambit-cni -p ambit-bench --bin ambitctl --bin ambit-controller --bin ztunnel --bin waypoint --bin ambit-cni --bin local_mesh

# 1,000 idle connections hold about 2,000 descriptors in the bench and in each proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "ambit: load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec target/release/local_mesh "$@"
