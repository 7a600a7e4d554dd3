#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# pvdma with a real Linux guest: boots Debian 12's cloud kernel with a tiny
# busybox initramfs on `-M q35 -accel tcg -device pvdma -device edu`; a
# static userspace program in the guest (guest/pvdma-guest-test.c) drives
# pvdma through its doorbell and makes edu DMA through the IOVAs it mapped;
# then a kernel module (guest/kmod/pvdma_hc.c, built here with kbuild
# against Debian's headers for the same kernel) drives it by hypercall.
# While the mappings are live, and again before the guest powers off, the
# host prints `query-pvdma` (QMP). See docs/guest-demo.md.
#
# Usage: tests/guest/guest-demo.sh [QEMU_BINARY]
#   Without QEMU_BINARY, tools/qemu-build.sh provides it (cached).
#   GUEST_DEMO_TIMEOUT (seconds, default 120) bounds the whole boot.
# Exit status 0 only when the guest printed PVDMA-GUEST-DEMO: PASS.
set -euo pipefail

. "$(dirname "$0")/../framework/lib.sh"


# The guest kernel: the pinned 6.1 of guest-lib.sh. To try another one, set
# GUEST_KERNEL_PKG, _VER and _SHA256 (an empty SHA-256 takes the one
# `apt-cache show` gives); the headers follow GUEST_HEADERS_* (see
# docs/guest-demo.md). busybox: GUEST_BUSYBOX_VER/_SHA256 (guest-lib.sh).
guest_kernel_select 6.1
GK_IMAGE_PKG=${GUEST_KERNEL_PKG:-$GK_IMAGE_PKG}
GK_IMAGE_DEBS=$GK_IMAGE_PKG   # 6.1's image is one package
GK_VER=${GUEST_KERNEL_VER:-$GK_VER}
GK_IMAGE_SHA256=${GUEST_KERNEL_SHA256-$GK_IMAGE_SHA256}
GK_ABI=${GUEST_HEADERS_ABI:-$GK_ABI}
GK_RELEASE=$GK_ABI-cloud-amd64
GK_HEADERS_VER=${GUEST_HEADERS_VER:-$GK_VER}
GK_HEADERS_SHA256=${GUEST_HEADERS_SHA256-$GK_HEADERS_SHA256}
GK_COMMON_SHA256=${GUEST_HEADERS_COMMON_SHA256-$GK_COMMON_SHA256}
GK_KBUILD_PKG=${GUEST_KBUILD_PKG:-$GK_KBUILD_PKG}
GK_KBUILD_SHA256=${GUEST_KBUILD_SHA256-$GK_KBUILD_SHA256}
TIMEOUT=${GUEST_DEMO_TIMEOUT:-120}

GUEST_SRC="$PVDMA_ROOT/guest"

t_start=$(date +%s.%N)

guest_tools
guest_kernel
guest_busybox
guest_headers
# pvdma_hc.ko, keyed by its sources, the ABI header, the headers and gcc.
ko=$(guest_build_module "$GUEST_SRC/kmod" pvdma_hc.ko)

# The initramfs, keyed by the package versions and the guest sources.
key=$( { echo "$GK_IMAGE_PKG $GK_VER $GUEST_BUSYBOX_VER"; gcc --version | head -n1
         cat "$GUEST_SRC/init" "$GUEST_SRC/pvdma-guest-test.c" "$GUEST_ABI_H" "$ko"; } |
       sha256sum | cut -c1-16)
idir="$GUEST_CACHE/initramfs-$key"
if [ ! -f "$idir/initramfs.cpio.gz" ]; then
    log "building the initramfs ($idir)"
    guest_initramfs_begin "$idir" sh mount umount cat echo ls sleep stty \
        uname poweroff reboot cut dmesg lspci sync insmod rmmod grep
    root=$GI_ROOT
    gcc -static -O2 -Wall -Wextra -Werror -I "$PVDMA_ROOT/rust-core/include" \
        -o "$root/bin/pvdma-guest-test" "$GUEST_SRC/pvdma-guest-test.c"
    strip "$root/bin/pvdma-guest-test"
    install -m 0755 "$GUEST_SRC/init" "$root/init"
    install -m 0644 "$ko" "$root/lib/modules/pvdma_hc.ko"
    guest_initramfs_end "$idir"
fi

if [ $# -ge 1 ]; then
    qemu=$1
else
    qemu=$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)
fi
[ -x "$qemu" ] || { echo "not an executable: $qemu" >&2; exit 1; }

t_ready=$(date +%s.%N)
log "guest prepared in $(python3 -c "print(round($t_ready - $t_start, 1))") s:" \
    "$GK_DIR/vmlinuz, $idir/initramfs.cpio.gz"
exec python3 "$PVDMA_ROOT/tests/guest/guest-demo-boot.py" "$qemu" \
    "$GK_DIR/vmlinuz" "$idir/initramfs.cpio.gz" "$TIMEOUT"
