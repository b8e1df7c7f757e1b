#!/usr/bin/env bash
# Runs a whole Ambit mesh on this machine (the README's first command): nodes and pods as
# network namespaces, the real controller, one ztunnel per node and a sample app, with what
# happens shown live; Ctrl-C stops and removes everything. As root on a fresh Debian machine:
# installs the system packages it needs, checks Rust, builds, then hands over to `ambitctl up`
# (arguments are passed on: --nodes, --pods-per-node, --enroll, --objects, --detach...).
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
cd "$here/.."

need_root
system_deps
rust_toolchain

echo "ambit: building (the first build takes a few minutes)" >&2
cargo build --release --locked -p ambitctl -p ambit-controller -p ambit-ztunnel -p ambit-waypoint -p ambit-cni
exec target/release/ambitctl up "$@"
