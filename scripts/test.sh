#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs every test of the project: formatting, lints, Rust unit, property,
# stress and integration tests, the loom model check, the C API tests under
# meson (with the header drift check), short fuzz runs, and the QEMU side:
# the patched QEMU build (about 4.5 min when the cache is cold, seconds
# after), the patch series check, the pvdma smoke test (real DMA through the
# device) and QEMU's own qtest for the device, pvdma-test.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"

ensure_rust_build_deps

step() { log "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace

if [ -x scripts/loom.sh ]; then
    step "loom model check"
    scripts/loom.sh
fi

if [ -f meson.build ]; then
    step "meson test (C API, header drift)"
    builddir="$PVDMA_ROOT/build/meson"
    [ -d "$builddir" ] || meson setup "$builddir" >/dev/null
    meson test -C "$builddir" --print-errorlogs
fi

if [ -x scripts/fuzz.sh ]; then
    step "fuzz (short runs)"
    scripts/fuzz.sh short
fi

step "QEMU: build the patched QEMU (cached under ~/.cache/pvdma)"
qemu=$(scripts/qemu-build.sh | tail -n1)

if [ -x scripts/check-patches.sh ]; then
    step "QEMU: patch series agrees with qemu-glue/, checkpatch"
    scripts/check-patches.sh
fi

step "QEMU: smoke test (QMP, PCI bus)"
scripts/qemu-smoke.sh "$qemu"

if [ -x scripts/qemu-pvdma-smoke.sh ]; then
    step "QEMU: pvdma smoke test"
    scripts/qemu-pvdma-smoke.sh "$qemu"
fi

step "QEMU: run.sh's demo (edu DMA through pvdma under TCG)"
/usr/bin/python3 scripts/pvdma-demo.py "$qemu" 120 >&2

step "QEMU: qtest pvdma-test"
scripts/qemu-qtest.sh pvdma-test

log "all tests passed"
