#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Prepares the pvdma I/O guest for one kernel: the Debian cloud kernel
# (6.1, 6.12 or 7.2, chosen in guest-lib.sh), its virtio/NVMe modules, the
# guest IOMMU driver guest/linux/pvdma_iommu.ko when guest/linux exists
# (built against the same kernel's headers), guest/io/pvdma-io (static)
# and an initramfs with guest/io/init. Everything is cached under
# $PVDMA_CACHE/guest (docs/guest-io.md).
#
# Usage: tools/guest-io-prepare.sh 6.1|6.12|7.2
# Env:   PVDMA_IOMMU_OPTIONAL  kernels the driver is not ported to yet
#                              (default "7.2"): for them a pvdma_iommu.ko
#                              that does not build gives PVDMA_IOMMU=no
#                              instead of an error
#        PVDMA_IOMMU_KO        a pvdma_iommu.ko built elsewhere (the DKMS
#                              package's, tests/tools/dkms-test.sh) to put
#                              into the guest instead of the test build;
#                              its vermagic must name the kernel's release
# Prints KEY=VALUE lines on stdout (logs go to stderr):
#   KERNEL=6.1  RELEASE=6.1.0-50-cloud-amd64  VMLINUZ=...  INITRD=...
#   PVDMA_IOMMU=yes|no  VIRTIO_IOMMU=yes|no (a virtio-iommu driver exists)
set -euo pipefail

. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/guest-lib.sh"

[ $# -eq 1 ] || { echo "usage: $0 6.1|6.12|7.2" >&2; exit 2; }
guest_kernel_select "$1"
IO_SRC="$PVDMA_ROOT/guest/io"
# The guest IOMMU driver's sources (pvdma-iommu.c, Kbuild taking
# PVDMA_ABI_INC, Makefile); PVDMA_GUEST_LINUX points elsewhere.
LINUX_SRC=${PVDMA_GUEST_LINUX:-$PVDMA_ROOT/guest/linux}
IOMMU_OPTIONAL=${PVDMA_IOMMU_OPTIONAL-}

guest_tools
guest_kernel
guest_busybox

# The guest IOMMU driver, once guest/linux has one. On a kernel of
# IOMMU_OPTIONAL a build failure leaves it out (PVDMA_IOMMU=no); only
# the driver's own build may fail so: the headers and a build of
# guest/kmod (pvdma_hc.ko) must work on every kernel.
iommu_ko=
if [ -n "${PVDMA_IOMMU_KO:-}" ]; then
    [ -f "$PVDMA_IOMMU_KO" ] || die "PVDMA_IOMMU_KO: no file $PVDMA_IOMMU_KO"
    vermagic=$(modinfo -F vermagic "$PVDMA_IOMMU_KO")
    [ "${vermagic%% *}" = "$GK_RELEASE" ] ||
        die "PVDMA_IOMMU_KO was built for ${vermagic%% *}, not $GK_RELEASE"
    iommu_ko=$PVDMA_IOMMU_KO
elif [ -f "$LINUX_SRC/Kbuild" ]; then
    guest_headers
    # The test build: test_skip_map and test_ro_map exist only in it.
    if [[ " $IOMMU_OPTIONAL " == *" $GK_NAME "* ]]; then
        guest_build_module "$PVDMA_ROOT/guest/kmod" pvdma_hc.ko >/dev/null
        iommu_ko=$(guest_build_module "$LINUX_SRC" pvdma_iommu.ko PVDMA_TEST=1) || {
            iommu_ko=
            log "pvdma_iommu.ko does not build against $GK_RELEASE (the driver is not ported to $GK_NAME yet): PVDMA_IOMMU=no"
        }
    else
        iommu_ko=$(guest_build_module "$LINUX_SRC" pvdma_iommu.ko PVDMA_TEST=1)
    fi
fi

# pvdma-io, keyed by its source and gcc.
pkey=$( { gcc --version | head -n1; cat "$IO_SRC/pvdma-io.c"; } |
        sha256sum | cut -c1-16)
pio="$GUEST_CACHE/pvdma-io-$pkey/pvdma-io"
if [ ! -x "$pio" ]; then
    log "building pvdma-io"
    rm -rf "${pio%/*}.tmp" && mkdir -p "${pio%/*}.tmp"
    gcc -static -O2 -Wall -Wextra -Werror -pthread \
        -o "${pio%/*}.tmp/pvdma-io" "$IO_SRC/pvdma-io.c"
    strip "${pio%/*}.tmp/pvdma-io"
    rm -rf "${pio%/*}" && mv "${pio%/*}.tmp" "${pio%/*}"
fi

# The kernel's modules, in three groups that /init loads in this order
# (around the IOMMU driver): the virtio PCI transport, virtio-iommu, the
# device drivers. Built-in ones (NVMe in both kernels, virtio_pci in 6.12)
# are left out; a module needed by an earlier group is not repeated.
mods=$(mktemp -d)
trap 'rm -rf "$mods"' EXIT
: >"$mods/load"
add_group() {   # add_group GROUP MODULE...
    local group=$1 ko
    shift
    for ko in $(guest_modules_closure "$mods/ko" "$@"); do
        grep -q " $ko\$" "$mods/load" || echo "$group $ko" >>"$mods/load"
    done
}
add_group core virtio_pci
virtio_iommu=no
if grep -q '^CONFIG_VIRTIO_IOMMU=[ym]' "$GK_DIR/config"; then
    virtio_iommu=yes
    add_group virtio-iommu virtio_iommu
fi
add_group drivers virtio_blk virtio_net nvme
mkdir -p "$mods/ko"

# The initramfs, keyed by everything that goes into it.
key=$( { echo "$GK_IMAGE_PKG $GK_VER $GUEST_BUSYBOX_VER"
         cat "$IO_SRC/init" "$pio" "$mods/load" ${iommu_ko:+"$iommu_ko"}
         find "$mods/ko" -name '*.ko' -print0 | LC_ALL=C sort -z |
             xargs -0r cat; } |
       sha256sum | cut -c1-16)
idir="$GUEST_CACHE/io-initramfs-$GK_NAME-$key"
if [ ! -f "$idir/initramfs.cpio.gz" ]; then
    log "building the I/O initramfs ($idir)"
    guest_initramfs_begin "$idir" sh mount umount cat echo ls sleep stty \
        uname poweroff reboot cut dmesg sync insmod rmmod lsmod grep readlink \
        dirname basename head tail tr wc sed test [ printf find
    root=$GI_ROOT
    install -m 0755 "$pio" "$root/bin/pvdma-io"
    install -m 0755 "$IO_SRC/init" "$root/init"
    cp "$mods/ko"/*.ko "$root/lib/modules/" 2>/dev/null || true
    cp "$mods/load" "$root/lib/modules/load"
    [ -z "$iommu_ko" ] || install -m 0644 "$iommu_ko" "$root/lib/modules/pvdma_iommu.ko"
    guest_initramfs_end "$idir"
fi

echo "KERNEL=$GK_NAME"
echo "RELEASE=$GK_RELEASE"
echo "VMLINUZ=$GK_DIR/vmlinuz"
echo "INITRD=$idir/initramfs.cpio.gz"
echo "PVDMA_IOMMU=$([ -n "$iommu_ko" ] && echo yes || echo no)"
echo "VIRTIO_IOMMU=$virtio_iommu"
