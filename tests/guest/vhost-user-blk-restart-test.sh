#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Nothing lost across a crash or an upgrade of pvdma-vhost-user-blk: for
# each guest kernel and each variant, one boot of
# tests/guest/vhost-user-blk-restart-boot.py. QEMU's chardev reconnects
# (reconnect-ms); the guest runs pvdma-io disk-stress (O_DIRECT writes and
# reads by 4 threads, every byte checked, then all of it read back) on the
# vhost-user disk while the harness SIGKILLs the backend VUB_KILLS times
# and stops it once with SIGTERM (it must finish what it took and exit 0),
# each time at a random moment (a SIGKILL while a request is in flight in
# the backend) and starting a new backend process on the same socket and
# image. Each boot passes only if the guest's I/O completes with every
# byte right and no I/O error in its kernel log, every new backend served
# requests, the requests a killed one had taken were resubmitted from the
# inflight region, and nothing hangs (hard timeouts on QEMU and every
# backend) or is left running.
#
#   pvdma         vhost-user-blk-pci,iommu_platform=on behind pvdma (the
#                 guest's pvdma_iommu.ko; the backend in sg mode on IOTLB
#                 translations), lazy invalidation
#   none          no IOMMU (the device without iommu_platform)
#   pvdma-strict  pvdma with iommu.strict=1 (every unmap waits for the
#                 backend's ack, also while none is connected)
#   pvdma-window  pvdma with the backend in window mode
# The last two on the first kernel only (VUB_RESTART_EXTRA).
#
# See docs/vhost-user.md ("Restarting the backend").
#
# Usage: tests/guest/vhost-user-blk-restart-test.sh [QEMU_BINARY]
# Env:   VUB_RESTART_KERNELS   kernels (default "6.1 6.12 7.2"; a kernel
#                              without pvdma_iommu.ko boots variant none only)
#        VUB_RESTART_VARIANTS  variants (default "pvdma none")
#        VUB_RESTART_EXTRA     variants on the first kernel only (default
#                              "pvdma-strict pvdma-window")
#        VUB_KILLS             SIGKILLs per boot (default 4)
#        VUB_STRESS_SECS       the guest's I/O, seconds (default 12)
#        VUB_NUM_QUEUES        the device's queues, one thread each in the
#                              backend (default 2: the guest has 2 vCPUs)
#        VUB_TIMEOUT           hard limit per boot, seconds (default 150)
#        VUB_SEED              the restart moments' seed (default: random,
#                              printed in each summary line)
#        VUB_EXPECT_RESUBMIT   1 (default): a boot also fails unless the
#                              backends counted requests resubmitted from
#                              the inflight region after the SIGKILLs that
#                              hit one inside a request (one may escape),
#                              and none after the SIGTERM; 0: data only
set -euo pipefail

. "$(dirname "$0")/../framework/lib.sh"

KERNELS=${VUB_RESTART_KERNELS:-6.1 6.12 7.2}
VARIANTS=${VUB_RESTART_VARIANTS:-pvdma none}
EXTRA=${VUB_RESTART_EXTRA-pvdma-strict pvdma-window}
KILLS=${VUB_KILLS:-4}
SECS=${VUB_STRESS_SECS:-12}
TIMEOUT=${VUB_TIMEOUT:-150}
vub_prepare "$@"

declare -A kvariants
first=1
for k in $KERNELS; do
    log "preparing the I/O guest for $k"
    out=$("$PVDMA_ROOT/tools/guest-io-prepare.sh" "$k")
    kvariants[$k]=$VARIANTS
    [ $first = 0 ] || kvariants[$k]="$VARIANTS $EXTRA"
    first=0
    if grep -qx 'PVDMA_IOMMU=no' <<<"$out"; then
        kvariants[$k]=$(tr ' ' '\n' <<<"${kvariants[$k]}" | { grep -vx 'pvdma.*' || true; } | tr '\n' ' ')
        log "kernel $k has no pvdma_iommu.ko: variants ${kvariants[$k]:-none at all}"
    fi
done

opts=()
[ -z "${VUB_SEED:-}" ] || opts+=(--seed "$VUB_SEED")
opts+=(--num-queues "${VUB_NUM_QUEUES:-2}")
[ "${VUB_EXPECT_RESUBMIT:-1}" = 0 ] || opts+=(--expect-resubmit)
boots_begin vhost-user-blk-restart-test
for k in $KERNELS; do
    for v in ${kvariants[$k]}; do
        case $v in
        pvdma|none) vargs=(--variant "$v") ;;
        pvdma-strict) vargs=(--variant pvdma --strict) ;;
        pvdma-window) vargs=(--variant pvdma --access-mode window) ;;
        *) echo "unknown variant '$v'" >&2; exit 2 ;;
        esac
        log "kernel $k, variant $v"
        boot_run "kernel $k variant $v" \
            python3 "$PVDMA_ROOT/tests/guest/vhost-user-blk-restart-boot.py" \
            --qemu "$qemu" --backend "$backend" --kernel "$k" "${vargs[@]}" \
            --kills "$KILLS" --graceful 1 --stress-secs "$SECS" \
            --timeout "$TIMEOUT" "${opts[@]}"
    done
done

boots_end
