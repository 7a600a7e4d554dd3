#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The main job: build everything (the Rust core, then QEMU 10.2.2 with the
# pvdma patch series, cached under ~/.cache/pvdma), then start that QEMU
# with -device pvdma -device edu (q35, TCG, -nographic, a firmware that only
# halts the CPU, no guest kernel) and drive it as a guest driver would, over
# QEMU's qtest protocol and QMP (scripts/pvdma-demo.py): map guest pages
# through the doorbell, make edu DMA through the IOVAs and check the bytes,
# show an unmapped IOVA refused, and print query-pvdma and info pvdma.
#
# Env: PVDMA_DEMO_TIMEOUT  seconds before QEMU is killed (default 120)
# The translation benchmarks that run.sh ran before the device landed:
# cargo bench -p pvdma-benches.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"
ensure_rust_build_deps

# qemu-build.sh builds libpvdma (the Rust core) through our meson build
# first, then QEMU against it.
log "building libpvdma and the patched QEMU (about 4.5 min the first time)"
qemu=$(scripts/qemu-build.sh | tail -n1)
log "QEMU: $qemu"

log "running QEMU with -device pvdma -device edu"
exec /usr/bin/python3 scripts/pvdma-demo.py "$qemu" "${PVDMA_DEMO_TIMEOUT:-120}"
