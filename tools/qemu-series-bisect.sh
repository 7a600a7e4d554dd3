#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Checks that every patch of the pvdma series builds on its own: for each
# stage N of qemu-glue/series.toml, make a configured QEMU development tree
# look like the series after patch N (only changed files are rewritten, so
# the build is incremental) and run ninja on qemu-system-x86_64. Leaves the
# tree at the full series.
#
# Usage: tools/qemu-series-bisect.sh SRC BUILD
#   SRC    a QEMU git tree (e.g. a copy of the cached src/) to rewrite
#   BUILD  its build directory, configured as qemu-build.sh does
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PVDMA_TAG=bisect
. "$here/lib.sh"
src=${1:?usage: $0 SRC BUILD}
build=${2:?usage: $0 SRC BUILD}
n=$(grep -c '^\[\[patch\]\]' "$here/../qemu-glue/series.toml")

for ((stage = 1; stage <= n; stage++)); do
    printf '[bisect] patch %d of %d (%04d)\n' "$stage" "$n" "$((stage + 2))" >&2
    python3 "$here/make-patches.py" --sync "$src" --stage "$stage" >&2
    if ! ninja -C "$build" -j"${PVDMA_JOBS:-2}" qemu-system-x86_64 >"$build/bisect-$stage.log" 2>&1; then
        grep -E 'error|FAILED' "$build/bisect-$stage.log" | head -20 >&2
        printf '[bisect] FAIL at patch %04d (log: %s)\n' "$((stage + 2))" "$build/bisect-$stage.log" >&2
        exit 1
    fi
    "$build/qemu-system-x86_64" -device help 2>/dev/null | grep -q '"pvdma"' &&
        have=yes || have=no
    printf '[bisect] patch %04d builds (-device pvdma: %s)\n' "$((stage + 2))" "$have" >&2
done
printf '[bisect] PASS: all %d patches build\n' "$n" >&2
