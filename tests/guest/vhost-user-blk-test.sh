#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# pvdma-vhost-user-blk serving a Debian 6.1 guest's disk through pvdma
# (vhost-user-blk-pci,iommu_platform=on,disable-legacy=on, the guest's
# pvdma_iommu.ko as its IOMMU): three boots of tests/guest/vhost-user-blk-boot.py:
#
#   sg, strict      disk-verify (O_DIRECT, every byte checked), then a read
#                   whose MAP the driver skips: refused by the backend
#                   (QEMU cannot translate its miss), FAULTS rises for that
#                   function only, the next read is correct
#   window, lazy    disk-verify through the contiguous IOVA window, two
#                   queues (the backend's --num-queues 2, 2 vCPUs)
#   sg, kill        SIGKILL the backend during disk-verify: QEMU stays up
#                   (QMP answers), everything is torn down, nothing hangs
#
# Each passing run must show IOTLB misses, updates and invalidations in the
# backend's counters, query-pvdma the disk attached and no fault (but the
# refused one). See docs/vhost-user.md.
#
# Usage: tests/guest/vhost-user-blk-test.sh [QEMU_BINARY]
# Env:   VUB_TIMEOUT   hard limit per boot, seconds (default 120)
#        VUB_RUNS      runs (default "sg-strict-refuse window kill")
set -euo pipefail

. "$(dirname "$0")/../framework/lib.sh"

TIMEOUT=${VUB_TIMEOUT:-120}
RUNS=${VUB_RUNS:-sg-strict-refuse window kill}
vub_prepare "$@"
log "preparing the I/O guest for 6.1"
"$PVDMA_ROOT/tools/guest-io-prepare.sh" 6.1 >/dev/null

boots_begin vhost-user-blk-test
for run in $RUNS; do
    case $run in
    sg-strict-refuse) args=(--mode sg --strict --refuse) ;;
    sg) args=(--mode sg) ;;
    window) args=(--mode window --queues 2) ;;
    window-strict) args=(--mode window --strict) ;;
    kill) args=(--mode sg --kill) ;;
    *) echo "unknown run '$run'" >&2; exit 2 ;;
    esac
    log "run $run"
    boot_run "run $run" \
        python3 "$PVDMA_ROOT/tests/guest/vhost-user-blk-boot.py" --qemu "$qemu" \
        --backend "$backend" "${args[@]}" --timeout "$TIMEOUT"
done

boots_end
