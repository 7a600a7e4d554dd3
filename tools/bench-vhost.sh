#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# vhost-user-blk benchmark (issue 11): pvdma-vhost-user-blk without an
# IOMMU and behind pvdma in each access mode, and QEMU's virtio-blk behind
# pvdma; sequential and 4 KiB random reads, IOTLB misses per I/O. See
# tools/bench-vhost.py --help and BENCHMARKS.md ("vhost-user-blk").
#
#   tools/bench-vhost.sh [--rounds 2] [--secs 5] [--configs ...] [--qemu BIN]
#       [--json F] [--markdown F]
#   tools/bench-vhost.sh --vs-qsd [--queues N] ...   against qemu-storage-daemon
#       (issue 21; BENCHMARKS.md, "vhost-user-blk against qemu-storage-daemon")
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ensure_apt python3 coreutils
# exec: SIGTERM, SIGHUP and Ctrl-C reach the Python side, which ends QEMU.
exec python3 "$PVDMA_ROOT/tools/bench-vhost.py" "$@"
