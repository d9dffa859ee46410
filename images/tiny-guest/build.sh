#!/bin/bash
# Build the Pairvisor tiny test guest from Debian packages into OUT:
#   vmlinuz          Debian kernel (linux-image-amd64's current dependency)
#   initrd.cpio.gz   busybox-static initramfs running ./init
#   packages.txt     exact package versions used
# Usage: build.sh OUT INIT POWER_BUTTON   (needs apt-get, dpkg-deb, gzip; no root needed)
set -euo pipefail
OUT=$(realpath -m "${1:?output dir}")
INIT=$(realpath "${2:?init script}"); POWER=$(realpath "${3:?power-button script}")
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$OUT"; cd "$W"
# As root, apt's sandbox user cannot write into our private temp dir; download as root instead.
APT=(apt-get -q); [ "$(id -u)" = 0 ] && APT+=(-o APT::Sandbox::User=root)
echo "tiny-guest: downloading linux-image-amd64 and busybox-static"
"${APT[@]}" download linux-image-amd64 busybox-static >/dev/null
KPKG=$(dpkg-deb -f linux-image-amd64_*.deb Depends | sed -n 's/^\(linux-image-[^ ,]*\).*/\1/p')
echo "tiny-guest: downloading $KPKG"
"${APT[@]}" download "$KPKG" >/dev/null
dpkg-deb -x "$KPKG"_*.deb k
dpkg-deb -x busybox-static_*.deb bb
KVER=$(ls k/lib/modules)
M=k/lib/modules/$KVER/kernel/drivers
R=$W/root
mkdir -p "$R"/{bin,proc,sys,dev,tmp,mod,etc/acpi/PWRF}
cp bb/bin/busybox "$R/bin/busybox"
for a in $(bb/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
# Debian builds these as modules; init loads them in this order.
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev \
         virtio/virtio_pci block/virtio_blk acpi/button input/evdev net/net_failover net/virtio_net; do
  cp "$M/$m.ko" "$R/mod/"
done
cp "k/lib/modules/$KVER/kernel/net/core/failover.ko" "$R/mod/"
install -m 0755 "$INIT" "$R/init"
install -m 0755 "$POWER" "$R/etc/acpi/PWRF/00000080"
# Fixed timestamps keep the archive identical for identical inputs.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . | LC_ALL=C sort | "$W/bb/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -9n) >"$OUT/initrd.cpio.gz"
cp "k/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
for d in linux-image-amd64_*.deb "$KPKG"_*.deb busybox-static_*.deb; do
  dpkg-deb --showformat='${Package} ${Version}\n' -W "$d"
done >"$OUT/packages.txt"
echo "tiny-guest: kernel $KVER, initramfs $(du -h "$OUT/initrd.cpio.gz" | cut -f1)"
