#!/usr/bin/env bash
# Builds Ambit's container images with buildah, from scratch: no base image is pulled from any
# registry. Each image holds one binary of this repository, the shared libraries it links (as
# ldd finds them on this Debian machine) and, for ztunnel, the iptables and iproute2 programs it
# runs inside pods and the ambit-cni plugin its init container installs on the node. The names are the ones the manifests use: <registry>/<component>:<tag>.
#
#   scripts/images.sh [--registry R] [--tag T] [--bin-dir DIR] [--no-build] [--check]
#
# --bin-dir DIR  take the binaries from DIR instead of building them (target/release after a
#                `cargo build --release`; the tests pass their own target/debug)
# --check        after building, run each image's binary with --version in the image (buildah,
#                chroot isolation: this needs no container runtime or network namespace)
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
cd "$here/.."

registry=ambit
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
bin_dir=""
check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) registry=${2:?--registry needs a value}; shift 2;;
    --tag) tag=${2:?--tag needs a value}; shift 2;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2;;
    --check) check=1; shift;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) die "unknown argument '$1' (see --help)";;
  esac
done
registry=${registry%/}

need_root
system_deps
# buildah makes the images; iptables and iproute2 are copied into ztunnel's.
apt_install buildah iptables iproute2

if [ -z "$bin_dir" ]; then
  rust_toolchain
  echo "ambit: building release binaries" >&2
  cargo build --release --locked -p ambit-ztunnel -p ambit-cni -p ambit-controller \
    -p ambit-waypoint --bin ztunnel --bin ambit-cni --bin ambit-controller --bin waypoint
  bin_dir=target/release
fi

# vfs needs no kernel overlay support, so the same script works in CI and in nested sandboxes.
bah() { buildah --storage-driver vfs "$@"; }

# add_file ROOT PATH: copy PATH (following links) into ROOT at the same path.
add_file() {
  mkdir -p "$1$(dirname "$2")"
  cp -L "$2" "$1$2"
}

# add_linked ROOT PATH: every shared library PATH links, and the dynamic loader.
add_linked() {
  local lib
  # ldd prints "libx.so => /path (addr)" and the loader as "/lib64/ld-linux... (addr)".
  for lib in $(ldd "$2" | grep -o '/[^ ]*'); do
    [ -e "$1$lib" ] || add_file "$1" "$lib"
  done
}

# add_program ROOT PATH [NAME]: the program at /usr/local/bin/NAME (or at its own path when NAME
# is empty) with what it links.
add_program() {
  local root=$1 path=$2 name=${3:-}
  [ -x "$path" ] || die "$path is missing or not executable"
  if [ -n "$name" ]; then
    mkdir -p "$root/usr/local/bin"
    cp -L "$path" "$root/usr/local/bin/$name"
  else
    add_file "$root" "$path"
  fi
  add_linked "$root" "$path"
}

# base_files ROOT: what a program expects of any Linux root: users (root and nonroot 65532, the
# uid the manifests run the controller and waypoints as), and writable /tmp and /run.
base_files() {
  mkdir -p "$1/etc" "$1/tmp" "$1/run"
  chmod 1777 "$1/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$1/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$1/etc/group"
}

# ztunnel programs iptables and policy routing inside each pod's namespace: it runs
# iptables-restore/-save (and the ip6tables ones) and `ip`. Debian's iptables are one multi-call
# binary whose behaviour follows the name it is called by, plus modules it loads at run time.
ztunnel_extras() {
  local root=$1 multi name xt lib
  multi=$(readlink -f "$(command -v iptables-restore)")
  add_program "$root" "$multi"
  for name in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
    ln -sf "$multi" "$root/usr/sbin/$name"
  done
  xt=$(dirname "$(readlink -f "$(ldd "$multi" | grep -o '/[^ ]*libxtables[^ ]*')")")/xtables
  if [ -d "$xt" ]; then
    mkdir -p "$root$xt"
    for lib in "$xt"/*.so; do add_file "$root" "$lib"; add_linked "$root" "$lib"; done
  fi
  add_program "$root" "$(readlink -f "$(command -v ip)")"
  mkdir -p "$root/usr/bin" "$root/sbin"
  [ -e "$root/usr/bin/ip" ] || ln -sf "$(readlink -f "$(command -v ip)")" "$root/usr/bin/ip"
}

# build COMPONENT BINARY USER: one image.
build() {
  local component=$1 binary=$2 user=$3 root ctr image
  image="$registry/$component:$tag"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' RETURN
  base_files "$root"
  add_program "$root" "$bin_dir/$binary" "$binary"
  if [ "$component" = ztunnel ]; then
    ztunnel_extras "$root"
    # Copied to the node by the DaemonSet's init container (`ambit-cni install`).
    add_program "$root" "$bin_dir/ambit-cni" ambit-cni
  fi
  ctr=$(bah from scratch)
  bah copy --quiet "$ctr" "$root/" / >/dev/null
  bah config --entrypoint "[\"/usr/local/bin/$binary\"]" --user "$user" \
    --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label org.opencontainers.image.title="ambit-$component" \
    --label org.opencontainers.image.version="$tag" "$ctr"
  bah commit --quiet --rm "$ctr" "$image" >/dev/null
  echo "ambit: built $image" >&2
  if [ "$check" = 1 ]; then
    ctr=$(bah from --quiet "$image")
    if ! out=$(bah run --isolation chroot "$ctr" -- "/usr/local/bin/$binary" --version 2>&1); then
      bah rm "$ctr" >/dev/null
      die "$image: '$binary --version' failed in the image: $out"
    fi
    if [ "$component" = ztunnel ]; then
      bah run --isolation chroot "$ctr" -- iptables-restore --version >/dev/null 2>&1 ||
        { bah rm "$ctr" >/dev/null; die "$image: iptables-restore does not run in the image"; }
      bah run --isolation chroot "$ctr" -- /usr/local/bin/ambit-cni --version >/dev/null 2>&1 ||
        { bah rm "$ctr" >/dev/null; die "$image: ambit-cni does not run in the image"; }
    fi
    bah rm "$ctr" >/dev/null
    echo "ambit: checked $image: $out" >&2
  fi
}

# ztunnel runs as root: it enters pods' namespaces and programs their iptables (the DaemonSet
# grants it NET_ADMIN and SYS_ADMIN). The others never need root.
build ztunnel ztunnel 0:0
build controller ambit-controller 65532:65532
build waypoint waypoint 65532:65532
bah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -F "$registry/" || true
