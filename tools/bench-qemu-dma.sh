#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# QEMU per-DMA cost (issue 12): a 4 KiB DMA, a 64 KiB scattered one and a
# 64 KiB contiguous one through pvdma beside no IOMMU and intel-iommu, in
# one QEMU binary under -accel qtest, timed inside QEMU by the QMP command
# x-pvdma-dma-bench; see tools/bench-qemu-dma.py --help and BENCHMARKS.md
# ("QEMU per-DMA cost").
#
#   tools/bench-qemu-dma.sh [--rounds 7] [--secs 0.3] [--qemu BIN]
#       [--baseline-qemu BIN] [--json F] [--perf PREFIX]
#
# Without --qemu the binary is tools/qemu-build.sh's (built when the
# patch series changed). Exit status 0 whatever the targets show.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ensure_apt python3 coreutils
export PVDMA_BENCH_CMD="tools/bench-qemu-dma.sh${*:+ $*}"
# exec: SIGTERM, SIGHUP and Ctrl-C reach the Python side, which ends QEMU.
exec python3 "$PVDMA_ROOT/tools/bench-qemu-dma.py" "$@"
