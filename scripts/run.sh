#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The main job: build everything (the Rust core, then QEMU 10.2.2 with the
# pvdma patch series, cached under ~/.cache/pvdma), then run pvdma doing
# real DMA, twice:
#
#  1. scripts/guest-demo.sh: boots Debian 12's stock cloud kernel with a
#     busybox initramfs on -M q35 -accel tcg -device pvdma -device edu; a
#     program in the guest finds both devices through sysfs, maps buffers
#     (guest-physical addresses from /proc/self/pagemap) through the
#     doorbell, makes edu DMA through the IOVAs, checks the data, shows an
#     unmapped IOVA refused, and the host prints query-pvdma.
#  2. scripts/pvdma-demo.py: the same device driven without a guest kernel,
#     over QEMU's qtest protocol and QMP, ending with query-pvdma and
#     info pvdma.
#
# Every QEMU runs under a hard timeout and is killed on every exit path.
# Env: GUEST_DEMO_TIMEOUT, PVDMA_DEMO_TIMEOUT (seconds, default 120 each).
# The translation benchmarks: scripts/bench.sh (see BENCHMARKS.md).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"
ensure_rust_build_deps

# qemu-build.sh builds libpvdma (the Rust core) through our meson build
# first, then QEMU against it.
log "building libpvdma and the patched QEMU (about 4.5 min the first time)"
qemu=$(scripts/qemu-build.sh | tail -n1)
log "QEMU: $qemu"

log "booting a Debian 12 guest with -device pvdma -device edu (TCG)"
scripts/guest-demo.sh "$qemu"

log "the same device driven over qtest and QMP, no guest kernel"
exec /usr/bin/python3 scripts/pvdma-demo.py "$qemu" "${PVDMA_DEMO_TIMEOUT:-120}"
