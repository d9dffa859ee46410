#!/usr/bin/env bash
# Install the system packages Pairvisor builds and runs with on Debian 12 (idempotent).
# QEMU 10.0 comes from bookworm-backports; its apt source is derived from the machine's own
# debian.sources so that no archive host is written into the repository.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-deps: run as root (apt-get, useradd)" >&2; exit 1; }

BUILD_PKGS=(libvirt-dev pkg-config protobuf-compiler libprotobuf-dev gcc g++)
# libvirt-daemon-system: libvirtd and virtlogd for the production URI qemu:///system (the agent's
# default, the embedded driver, needs neither); tests/tests/libvirtd.rs starts its own by hand.
# ipmitool: the controllers fence a lost host through its BMC with it (IPMI 2.0 lanplus).
RUN_PKGS=(libvirt0 libvirt-clients libvirt-daemon-driver-qemu libvirt-daemon-system etcd-server etcd-client iproute2 iputils-arping util-linux ipmitool)
GUEST_PKGS=(busybox-static gzip)
# openipmi: ipmi_sim, the lab's simulated BMC per host (controller/tests/bmc.rs uses it too);
# python3: the processes that write pages for the dirty-page trackers' tests.
# grub-rescue-pc: the GRUB rescue ISO the ISO library test uploads and boots.
# chromium: the browser the console's end-to-end test drives headless.
TEST_PKGS=(nftables socat openipmi e2fsprogs python3 grub-rescue-pc chromium)
BACKPORTS_PKGS=(qemu-system-x86 qemu-utils)

missing=()
for p in "${BUILD_PKGS[@]}" "${RUN_PKGS[@]}" "${GUEST_PKGS[@]}" "${TEST_PKGS[@]}" "${BACKPORTS_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null &&
    qemu-system-x86_64 --version | grep -qE 'version (1[0-9]|[2-9][0-9])\.'
}

# This script never starts a service: while apt-get runs, a policy-rc.d of ours (unless the
# machine has one, as containers do) refuses every start that packages such as
# libvirt-daemon-system ask invoke-rc.d / deb-systemd-invoke for. The marker lets a later run
# remove one left behind by a killed run.
POLICY=/usr/sbin/policy-rc.d
POLICY_MARKER="# pairvisor install-deps: temporary, refuses service starts"
if [ -f "$POLICY" ] && grep -qF "$POLICY_MARKER" "$POLICY"; then rm -f "$POLICY"; fi
no_service_starts() {
  [ -e "$POLICY" ] && return 0
  printf '#!/bin/sh\n%s\nexit 101\n' "$POLICY_MARKER" >"$POLICY"
  chmod 755 "$POLICY"
  trap 'rm -f "$POLICY"' EXIT
}

if [ ${#missing[@]} -gt 0 ] || ! qemu_ok; then
  no_service_starts
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

# libvirtd (qemu:///system) runs QEMU as libvirt-qemu, which Debian's libvirt-daemon-system puts in
# group kvm, and udev gives /dev/kvm to group kvm (rw). Without that (the user above created before
# the package, a machine without udev) libvirtd's capability probe, which may override file
# permissions, finds KVM while its cache check as libvirt-qemu does not: every libvirt call then
# re-probes QEMU, 4 s each here and 44 s for one define. Give libvirt-qemu what Debian gives it.
getent group kvm >/dev/null || groupadd -r kvm
id -nG libvirt-qemu | grep -qw kvm || usermod -a -G kvm libvirt-qemu
if [ -c /dev/kvm ] &&
  ! setpriv --reuid libvirt-qemu --regid libvirt-qemu --init-groups test -r /dev/kvm -a -w /dev/kvm; then
  echo "install-deps: /dev/kvm: group kvm, mode g+rw (what udev does on a normal host)"
  chgrp kvm /dev/kvm
  chmod g+rw /dev/kvm
fi

echo "install-deps: $(qemu-system-x86_64 --version | head -1); libvirt $(pkg-config --modversion libvirt); $(etcd --version 2>/dev/null | head -1)"
