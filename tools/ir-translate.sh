#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Instruction counts (callgrind Ir) per one-page translation for each read
# path variant of benches/examples/ir_translate.rs. Unlike criterion's
# nanoseconds these do not move with the load of a shared machine.
#
#   tools/ir-translate.sh [VARIANT...]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"

variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then
    variants=(table_lookup domain_translate vm_translate_in vm_translate vm_lookup
        translator_translate_in translator_translate translator_lookup
        translator_cached_translate translator_cached_lookup)
fi
cargo build -q --release -p pvdma-benches --example ir_translate
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target_dir/release/examples/ir_translate
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for v in "${variants[@]}"; do
    if ! valgrind --tool=callgrind --collect-atstart=no \
        --toggle-collect="ir_translate::run_*" \
        --callgrind-out-file="$out/$v.cg" "$bin" "$v" >"$out/$v.log" 2>&1; then
        grep -q usage "$out/$v.log" && { echo "$v: not in this build"; continue; }
        cat "$out/$v.log" >&2
        exit 1
    fi
    n=$(sed -n 's/^.*: \([0-9]*\) translations$/\1/p' "$out/$v.log")
    ir=$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$out/$v.cg")
    printf '%-26s %8.1f Ir/translation\n' "$v" "$(echo "$ir / $n" | bc -l)"
done
