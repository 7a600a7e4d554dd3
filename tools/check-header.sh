#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Fails when rust-core/include/pvdma.h is not what the pinned cbindgen
# generates from the C API crate (capi/, package pvdma-capi), i.e. when
# someone changed the C API without regenerating (or hand-edited) the
# committed header.
#
#   tools/check-header.sh          check (exit 1 and a diff on drift)
#   tools/check-header.sh --fix    regenerate the committed header
#
# The cbindgen version is pinned: another version words the same API
# differently and would make the check flap. It is installed with cargo
# into $PVDMA_TOOLS (default ~/.cache/pvdma/tools) when missing.
set -eu

CBINDGEN_VERSION=0.29.4
. "$(dirname "$0")/lib.sh"
root=$PVDMA_ROOT
tools=${PVDMA_TOOLS:-$PVDMA_CACHE/tools}
cbindgen=$tools/bin/cbindgen
config=$root/capi/cbindgen.toml
crate_dir=$root/capi
header=$root/rust-core/include/pvdma.h

have_pinned() {
    [ -x "$cbindgen" ] &&
        [ "$("$cbindgen" --version 2>/dev/null)" = "cbindgen $CBINDGEN_VERSION" ]
}

if ! have_pinned; then
    echo "check-header: installing cbindgen $CBINDGEN_VERSION into $tools" >&2
    cargo install cbindgen --version "$CBINDGEN_VERSION" --locked \
        --root "$tools" >&2
fi

tmp=$(mktemp "${TMPDIR:-/tmp}/pvdma.h.XXXXXX")
trap 'rm -f "$tmp"' EXIT INT TERM
"$cbindgen" --quiet --config "$config" --crate pvdma-capi --output "$tmp" \
    "$crate_dir"

if [ "${1:-}" = "--fix" ]; then
    cp "$tmp" "$header"
    echo "check-header: regenerated rust-core/include/pvdma.h"
    exit 0
fi

if ! diff -u "$header" "$tmp"; then
    echo "check-header: rust-core/include/pvdma.h is out of date with" \
        "the capi/ crate (cbindgen $CBINDGEN_VERSION)." >&2
    echo "check-header: run tools/check-header.sh --fix and commit" \
        "the header." >&2
    exit 1
fi
echo "check-header: rust-core/include/pvdma.h is up to date"
