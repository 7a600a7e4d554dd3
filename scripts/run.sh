#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The main job. Until the QEMU device lands, it builds the Rust core and runs
# the translation hot-path benchmarks beside their baselines.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"
ensure_rust_build_deps
if [ -x scripts/bench.sh ]; then
    exec scripts/bench.sh "$@"
fi
cargo bench -p pvdma-benches
