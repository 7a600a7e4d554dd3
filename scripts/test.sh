#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs every test of the project: formatting, lints, Rust unit, property,
# stress and integration tests, the loom model check, the C API tests under
# meson (with the header drift check), and short fuzz runs.
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

log "all tests passed"
