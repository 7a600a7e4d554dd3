#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Functional test of real disk and network I/O from Debian guests: for each
# kernel (6.1, 6.12; 7.2 on request) boots the I/O guest (guest/io, tests/framework/pvdma_guest.py)
# on q35/TCG with virtio-blk, NVMe and two virtio-net on one hub, and
# checks disk-verify on both disks and net-verify between the NICs:
#
#   none          no IOMMU (proves the harness)
#   pvdma-bypass  -device pvdma, no guest driver: the devices bypass it;
#                 query-pvdma must show them not attached and FAULTS 0
#   pvdma         once guest/linux exists: pvdma_iommu.ko in the guest,
#   pvdma-strict  lazy and iommu.strict=1; query-pvdma at the end must
#                 show every device under test attached and FAULTS 0;
#                 the lazy one first removes the pvdma function (sysfs)
#   pvdma-rp      the same with libvirt's q35 layout, every device behind
#   pvdma-rp-strict its own pcie-root-port; each also hot-unplugs the
#                 virtio-blk function under I/O and plugs it in again
#                 (lazy: ACPI hotplug, QEMU's default; strict: the guest's
#                 pciehp, then refused DMAs on the NVMe disk)
#                 (the four above with queued=0: every request synchronous)
#   pvdma-q       the driver's queued mode (queued=1, ABI section 3.2),
#   pvdma-q-strict lazy and strict, each ending with refused DMAs on the
#                 NVMe disk; query-pvdma must show the queues set up and
#                 used, no entry failed, and synchronous MAPs far fewer
#                 than queued ones
#
# Usage: tests/guest/guest-io-test.sh [QEMU_BINARY]
# Env:   GUEST_IO_KERNELS   kernels (default "6.1 6.12 7.2"; 7.2 is
#                           Debian testing's, docs/guest-io.md)
#        GUEST_IO_VARIANTS  variants (default: the list above that applies;
#                           on a kernel the driver is not ported to yet,
#                           where prepare says PVDMA_IOMMU=no, the first two)
#        GUEST_IO_TIMEOUT   hard limit per boot, seconds (default 90)
#        PVDMA_GUEST_LINUX  the guest driver's sources (default guest/linux)
# Exit status 0 only when every boot passed. See docs/guest-io.md.
set -euo pipefail

. "$(dirname "$0")/../framework/lib.sh"

KERNELS=${GUEST_IO_KERNELS:-6.1 6.12 7.2}
TIMEOUT=${GUEST_IO_TIMEOUT:-90}
NO_DRIVER_VARIANTS="none pvdma-bypass"
if [ -n "${GUEST_IO_VARIANTS:-}" ]; then
    VARIANTS=$GUEST_IO_VARIANTS
elif [ -f "${PVDMA_GUEST_LINUX:-$PVDMA_ROOT/guest/linux}/Kbuild" ]; then
    VARIANTS="none pvdma-bypass pvdma pvdma-strict pvdma-rp pvdma-rp-strict pvdma-q pvdma-q-strict"
else
    VARIANTS=$NO_DRIVER_VARIANTS
    log "no guest/linux yet: variants $VARIANTS only"
fi

ensure_apt python3 coreutils
if [ $# -ge 1 ]; then
    qemu=$1
else
    qemu=$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)
fi
[ -x "$qemu" ] || { echo "not an executable: $qemu" >&2; exit 1; }

# Prepare every kernel first, so a download or build failure shows before
# any boot. A kernel without pvdma_iommu.ko (guest-io-prepare.sh's
# PVDMA_IOMMU_OPTIONAL: the driver is not ported to it yet) boots the
# variants without the driver only, unless GUEST_IO_VARIANTS says otherwise.
declare -A kvariants
for k in $KERNELS; do
    log "preparing the I/O guest for $k"
    out=$("$PVDMA_ROOT/tools/guest-io-prepare.sh" "$k")
    kvariants[$k]=$VARIANTS
    if [ -z "${GUEST_IO_VARIANTS:-}" ] && grep -qx 'PVDMA_IOMMU=no' <<<"$out" &&
       [ "$VARIANTS" != "$NO_DRIVER_VARIANTS" ]; then
        kvariants[$k]=$NO_DRIVER_VARIANTS
        log "kernel $k has no pvdma_iommu.ko: variants ${kvariants[$k]} only"
    fi
done

boots_begin guest-io-test
for k in $KERNELS; do
    for v in ${kvariants[$k]}; do
        extra=()
        variant=$v
        limit=$TIMEOUT
        if [ "$v" = pvdma ]; then
            # Lazy, leaving the VGA function (00:01.0) alone, and with the
            # pvdma function removed through sysfs before the I/O (the
            # driver keeps what it needs for as long as it is loaded), over
            # the doorbell (its registers must outlive the removal; the
            # strict variant takes the hypercall when TCG offers it).
            extra=(--modparams exclude=00:01.0,transport=doorbell,queued=0
                   --expect-detached 00:01.0
                   --append pvdmaio.remove_pvdma=1)
        fi
        if [ "$v" = pvdma-strict ]; then
            # Strict, and ending with refused DMAs on the NVMe disk: into
            # a buffer never mapped, then into one mapped read-only.
            variant=pvdma
            extra=(--modparams queued=0 --strict --refuse both)
        fi
        if [ "$v" = pvdma-rp ]; then
            variant=pvdma
            extra=(--modparams queued=0 --topology rootports --hotplug acpi)
            limit=$((TIMEOUT + 60))   # the hotplug cycle and one more verify
        fi
        if [ "$v" = pvdma-rp-strict ]; then
            variant=pvdma
            extra=(--modparams queued=0 --strict --topology rootports
                   --hotplug pciehp --refuse both)
            limit=$((TIMEOUT + 60))
        fi
        if [ "$v" = pvdma-q ] || [ "$v" = pvdma-q-strict ]; then
            # Queued mode, where the host offers it (--expect-queued
            # fails the run when it does not), ending with refused DMAs.
            variant=pvdma
            extra=(--modparams queued=1 --expect-queued --refuse both)
            [ "$v" = pvdma-q ] || extra+=(--strict)
        fi
        log "kernel $k, variant $v"
        boot_run "kernel $k variant $v" \
            python3 "$PVDMA_ROOT/tests/framework/pvdma_guest.py" --qemu "$qemu" \
            --kernel "$k" --variant "$variant" "${extra[@]}" --timeout "$limit"
    done
done

boots_end
