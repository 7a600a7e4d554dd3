#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The main job: build everything (the Rust core, QEMU 10.2.2 with the pvdma
# patch series, the guest driver pvdma_iommu.ko against Debian's 6.1
# headers; all cached under ~/.cache/pvdma), then show pvdma doing real
# work:
#
#  1. Debian 12's stock cloud kernel boots under TCG on -M q35 with
#     -device pvdma, virtio-blk, NVMe and two virtio-net NICs on a hub,
#     loads pvdma_iommu.ko as its IOMMU, and does disk and network I/O
#     with every byte checked; the host prints query-pvdma while the
#     mappings are live and at the end (tests/framework/pvdma_guest.py, mode demo).
#  2. The throughput of the same guest through pvdma with queued requests
#     (the guest driver's default), with synchronous ones (queued=0), and
#     with no IOMMU, in one run, and QEMU's CPU time and pvdma requests
#     per I/O (tools/bench-e2e.sh, one round; the full comparison with
#     intel-iommu and virtio-iommu is BENCHMARKS.md's "End-to-end I/O").
#  3. The same guest's disk served by pvdma-vhost-user-blk, a separate
#     process that reaches the guest's rings and buffers only through the
#     translations QEMU sends it (vhost-user IOTLB) from pvdma, with every
#     byte checked and the backend's counters printed
#     (tests/guest/vhost-user-blk-boot.py; docs/vhost-user.md).
#  4. A restart under I/O with nothing lost: the same disk while the guest
#     writes and reads it (every byte checked), the backend SIGKILLed
#     several times and stopped once with SIGTERM, a new process taking
#     over the socket each time and QEMU reconnecting to it; a summary of
#     kills, restarts, requests resubmitted and bytes verified
#     (tests/guest/vhost-user-blk-restart-boot.py).
#  5. The earlier demos: a guest driving pvdma by hand and making edu DMA
#     through it (tests/guest/guest-demo.sh), and the device driven over
#     qtest and QMP with no guest kernel (tools/pvdma-demo.py).
#
# Every QEMU runs under a hard timeout and is killed on every exit path.
# Env: RUN_KERNEL (6.1, 6.12 or 7.2, default 6.1), RUN_BENCH_SECS (default 3).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"
ensure_rust_build_deps
ensure_apt python3 coreutils

kernel=${RUN_KERNEL:-6.1}
secs=${RUN_BENCH_SECS:-3}

# qemu-build.sh builds libpvdma (the Rust core) through our meson build
# first, then QEMU against it.
log "building libpvdma and the patched QEMU (about 5 min the first time)"
qemu=$(tools/qemu-build.sh | tail -n1)
log "QEMU: $qemu"

log "1/5: a Debian $kernel guest with pvdma_iommu.ko does disk and network I/O through pvdma"
python3 tests/framework/pvdma_guest.py --qemu "$qemu" --kernel "$kernel" \
    --variant pvdma --mode demo --timeout 150

log "2/5: throughput through pvdma, queued and synchronous, beside the same guest without an IOMMU"
tools/bench-e2e.sh --qemu "$qemu" --kernels "$kernel" \
    --variants none pvdma-sync pvdma --rounds 1 --secs "$secs"

log "3/5: the guest's disk on pvdma-vhost-user-blk, through pvdma's translations"
cargo build --quiet --release -p pvdma-vhost-user-blk
python3 tests/guest/vhost-user-blk-boot.py --qemu "$qemu" --kernel "$kernel" \
    --backend target/release/pvdma-vhost-user-blk --mode sg --timeout 150

log "4/5: pvdma-vhost-user-blk killed and restarted under the guest's I/O, nothing lost"
python3 tests/guest/vhost-user-blk-restart-boot.py --qemu "$qemu" --kernel "$kernel" \
    --backend target/release/pvdma-vhost-user-blk --variant pvdma --expect-resubmit \
    --num-queues 2 \
    --quiet --timeout 150

log "5/5: the guest demo (pvdma by hand, edu DMA) and the qtest/QMP demo"
tests/guest/guest-demo.sh "$qemu"
exec /usr/bin/python3 tools/pvdma-demo.py "$qemu" "${PVDMA_DEMO_TIMEOUT:-120}"
