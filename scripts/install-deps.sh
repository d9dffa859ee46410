#!/usr/bin/env bash
# Install the system packages Pairvisor builds and runs with on Debian 12 (idempotent).
# QEMU 10.0 comes from bookworm-backports; its apt source is derived from the machine's own
# debian.sources so that no archive host is written into the repository.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-deps: run as root (apt-get, useradd)" >&2; exit 1; }

BUILD_PKGS=(libvirt-dev pkg-config protobuf-compiler libprotobuf-dev gcc g++)
RUN_PKGS=(libvirt0 libvirt-clients libvirt-daemon-driver-qemu etcd-server etcd-client iproute2 iputils-arping)
GUEST_PKGS=(busybox-static gzip)
TEST_PKGS=(nftables socat)
BACKPORTS_PKGS=(qemu-system-x86 qemu-utils)

missing=()
for p in "${BUILD_PKGS[@]}" "${RUN_PKGS[@]}" "${GUEST_PKGS[@]}" "${TEST_PKGS[@]}" "${BACKPORTS_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null &&
    qemu-system-x86_64 --version | grep -qE 'version (1[0-9]|[2-9][0-9])\.'
}

if [ ${#missing[@]} -gt 0 ] || ! qemu_ok; then
  src=/etc/apt/sources.list.d/debian.sources
  bp=/etc/apt/sources.list.d/pairvisor-backports.sources
  if [ ! -f "$bp" ] && [ -f "$src" ]; then
    echo "install-deps: adding bookworm-backports (derived from $src)"
    sed -e 's/^Suites:.*/Suites: bookworm-backports/' "$src" |
      awk 'BEGIN{RS="";ORS="\n\n"} NR==1' >"$bp"
  fi
  echo "install-deps: apt-get update"
  apt-get update -qq
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deps: installing ${missing[*]:-QEMU from backports}"
  apt-get install -y -qq --no-install-recommends \
    "${BUILD_PKGS[@]}" "${RUN_PKGS[@]}" "${GUEST_PKGS[@]}" "${TEST_PKGS[@]}" >/dev/null
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BACKPORTS_PKGS[@]}" >/dev/null
fi

# libvirt 9.0 resolves its compiled-in user before reading qemu.conf, even in embed mode.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
  useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

echo "install-deps: $(qemu-system-x86_64 --version | head -1); libvirt $(pkg-config --modversion libvirt); $(etcd --version 2>/dev/null | head -1)"
