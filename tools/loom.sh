#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Model-checks with loom the lock-free page table (update and epoch
# reclamation), the software IOTLB's generation and the VM-wide lookup
# generation that several domains write. Miri would need a nightly toolchain, which we do not use.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"
export LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-2}
# A target dir of its own: the loom cfg changes every crate's build.
CARGO_TARGET_DIR="$PVDMA_ROOT/target/loom" \
RUSTFLAGS="--cfg loom --cfg crossbeam_loom" \
    cargo test -p pvdma --features loom --release --lib loom_tests
