#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# End-to-end I/O benchmark (issue 9): no IOMMU, pvdma, intel-iommu and
# virtio-iommu, lazy and strict, on Debian's 6.1 and 6.12 kernels, booted
# interleaved over several rounds with one QEMU binary; see
# tools/bench-e2e.py --help and BENCHMARKS.md ("End-to-end I/O").
#
#   tools/bench-e2e.sh [--rounds 2] [--secs 3] [--kernels 6.1 6.12]
#       [--variants none pvdma ...] [--qemu BIN] [--json F] [--markdown F]
#
# Without --qemu the binary is tools/qemu-build.sh's (built when the
# patch series changed). Exit status 0 whatever the targets show.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ensure_apt python3 coreutils
export PVDMA_BENCH_CMD="tools/bench-e2e.sh${*:+ $*}"
# exec: SIGTERM, SIGHUP and Ctrl-C reach the Python side, which ends QEMU.
exec python3 "$PVDMA_ROOT/tools/bench-e2e.py" "$@"
