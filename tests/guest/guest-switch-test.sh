#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Domain switches and shutdown of the guest IOMMU driver (pvdma_iommu.ko),
# in Debian's 6.1 and 6.12 guests (docs/guest-driver.md):
#
#   build   the module as shipped (no PVDMA_TEST) has no test_skip_map,
#           test_ro_map, test_partial_unmap, test_failed_replay,
#           test_queued_fail or test_cross_queue parameter;
#           the test build
#           (PVDMA_TEST=1) has them
#   switch  tests/guest/guest-switch-boot.py: an edu function moved 300
#           times between DMA domains while the host makes it DMA; no read
#           may reach guest RAM, no DETACH or ATTACH may be sent; an attach
#           whose replay the pin-limit refuses fails and leaves edu
#           attached, its DMA refused (test_failed_replay); one page
#           unmapped out of a 16 KiB mapping (test_partial_unmap) goes and
#           the rest stays; a page mapped on one CPU and unmapped on
#           another is applied in order (test_cross_queue); twice a
#           ring's entries are queued and unmapped without a failure, a
#           full ring synced on the way (test_ring_full); an overrun
#           queue the host stops makes the driver tear the queues down and
#           go synchronous (test_break_queue); a queued MAP
#           the pin-limit refuses is
#           reported by the SYNC after it and, with device and IOVA, by
#           the rebuild (test_queued_fail; with FEATURES.QUEUE only);
#           after the guest's power-off every endpoint is detached
#           (.shutdown)
#
# Usage: tests/guest/guest-switch-test.sh [QEMU_BINARY]
# Env:   GUEST_IO_KERNELS   kernels (default "6.1 6.12 7.2")
#        GUEST_IO_TIMEOUT   hard limit per boot, seconds (default 150)
#        PVDMA_GUEST_LINUX  the guest driver's sources (default guest/linux)
# Exit status 0 only when every check passed.
set -euo pipefail

. "$(dirname "$0")/../framework/lib.sh"
. "$PVDMA_ROOT/tools/guest-lib.sh"

KERNELS=${GUEST_IO_KERNELS:-6.1 6.12 7.2}
TIMEOUT=${GUEST_IO_TIMEOUT:-150}
LINUX_SRC=${PVDMA_GUEST_LINUX:-$PVDMA_ROOT/guest/linux}

ensure_apt python3 coreutils binutils
if [ $# -ge 1 ]; then
    qemu=$1
else
    qemu=$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)
fi
[ -x "$qemu" ] || { echo "not an executable: $qemu" >&2; exit 1; }

# The parameters a module declares (.modinfo's parm= entries).
module_params() {
    objcopy -O binary --only-section=.modinfo "$1" /dev/stdout |
        tr '\0' '\n' | sed -n 's/^parm=\([^:]*\):.*/\1/p' | sort
}

boots_begin guest-switch-test
for k in $KERNELS; do
    guest_kernel_select "$k"
    guest_headers >/dev/null
    prod=$(guest_build_module "$LINUX_SRC" pvdma_iommu.ko)
    test=$(guest_build_module "$LINUX_SRC" pvdma_iommu.ko PVDMA_TEST=1)
    p=$(module_params "$prod" | tr '\n' ' ')
    t=$(module_params "$test" | tr '\n' ' ')
    log "kernel $k: parameters as shipped: $p; test build: $t"
    for param in test_skip_map test_ro_map test_partial_unmap \
                 test_failed_replay test_queued_fail test_cross_queue \
                 test_ring_full test_break_queue; do
        if grep -qx "$param" <<<"${p// /$'\n'}"; then
            echo "kernel $k build: FAIL: the module as shipped has $param" >>"$BOOTS_SUMMARY"
            BOOTS_FAILED=1
        fi
        if ! grep -qx "$param" <<<"${t// /$'\n'}"; then
            echo "kernel $k build: FAIL: the test build lacks $param" >>"$BOOTS_SUMMARY"
            BOOTS_FAILED=1
        fi
    done
done

for k in $KERNELS; do
    log "preparing the I/O guest for $k"
    "$PVDMA_ROOT/tools/guest-io-prepare.sh" "$k" >/dev/null
done

for k in $KERNELS; do
    log "kernel $k: domain switches under DMA, then power-off"
    boot_run "kernel $k switch" \
        python3 "$PVDMA_ROOT/tests/guest/guest-switch-boot.py" --qemu "$qemu" \
        --kernel "$k" --timeout "$TIMEOUT"
done
boots_end
