# Shared by Ambit's set-up scripts: install what a fresh Debian machine lacks, or say
# exactly what is missing. Sourced, not run.

set -euo pipefail

die() { echo "ambit: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "this needs root (network namespaces, iptables): run it as root, e.g. with sudo"
}

# apt_install PKG... installs the Debian packages that are not installed yet, and only
# refreshes the package lists when something is missing, so a warm machine pays nothing.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages: ${missing[*]} (and no apt-get here to install them)"
  echo "ambit: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The system tools the mesh itself runs: iptables (capture; Debian's package also ships
# ip6tables, which closes IPv6 in enrolled pods), iproute2 (namespaces, veth, policy routing),
# a C compiler for ring's build, CA certificates for crates.io.
system_deps() {
  # containernetworking-plugins: the local mesh makes its pods through a real CNI chain
  # (bridge and host-local from /usr/lib/cni, then ambit-cni).
  apt_install iptables iproute2 gcc libc6-dev ca-certificates procps containernetworking-plugins
  local tool
  for tool in iptables-restore ip6tables-restore; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] \
      || die "$tool is missing although the iptables package is installed: install it (ztunnel needs both families)"
  done
}

rust_toolchain() {
  if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
  command -v cargo >/dev/null || die "Rust is missing: install rustup's stable toolchain (Rust 1.85 or newer), then run this again"
  local v
  v=$(rustc --version | awk '{print $2}')
  case "$v" in
    1.[0-7][0-9].*|1.8[0-4].*) die "Rust $v is too old: Ambit needs 1.85 or newer (rustup update stable)";;
  esac
}
