#!/usr/bin/env bash
# Benchmarks the local mesh (root, Debian): installs the reference proxy (haproxy) and the
# tools the bench drives, builds release binaries, then runs target/release/local_mesh, which
# brings up a mesh with `ambitctl up --detach`, measures direct TCP, the mesh and haproxy's
# mTLS tunnel between pods on the same node and across nodes, prints one table per placement
# and always tears the mesh down. Arguments are passed on (--quick for a smaller run).
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
cd "$here/.."

need_root
system_deps
# haproxy: the reference tunnel; openssl: its throw-away certificates.
apt_install haproxy openssl
rust_toolchain

echo "ambit: building (release)" >&2
cargo build --release --locked -p ambitctl -p ambit-controller -p ambit-ztunnel -p ambit-waypoint -p ambit-bench --bin ambitctl --bin ambit-controller --bin ztunnel --bin waypoint --bin local_mesh

# 1,000 idle connections hold about 2,000 descriptors in the bench and in each proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "ambit: load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec target/release/local_mesh "$@"
