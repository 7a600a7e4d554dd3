#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs every fuzz target of fuzz/Cargo.toml (cargo-fuzz, libFuzzer) on the
# stable toolchain (no sanitizer: -s none; see docs/testing.md).
#
#   tools/fuzz.sh short   each target ~60 s  (CI, tools/test.sh)
#   tools/fuzz.sh long    each target ~1 h   (by hand, before releases)
#
# PVDMA_FUZZ_SECONDS overrides the time per target. Exits non-zero on the
# first crashing target, after printing the crashing input's path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

CARGO_FUZZ_VERSION=0.13.2
mode=${1:-short}
case "$mode" in
short) seconds=${PVDMA_FUZZ_SECONDS:-60} ;;
long) seconds=${PVDMA_FUZZ_SECONDS:-3600} ;;
*)
    echo "usage: $0 short|long" >&2
    exit 2
    ;;
esac

command -v cargo >/dev/null || {
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
}
ensure_cargo_tool cargo-fuzz cargo-fuzz "$CARGO_FUZZ_VERSION"

cd "$PVDMA_ROOT/fuzz"
# Stable Rust: no sanitizer (they need -Z flags); debug assertions on so
# the library's internal consistency checks run too.
fuzz_flags=(--sanitizer none --debug-assertions)

mapfile -t targets < <(cargo fuzz list)
[ ${#targets[@]} -gt 0 ] || {
    echo "no fuzz targets in fuzz/Cargo.toml" >&2
    exit 1
}
log "building fuzz targets: ${targets[*]}"
cargo fuzz build "${fuzz_flags[@]}"

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    corpora=("corpus/$t")
    # Checked-in seeds are read, never written: new inputs go to corpus/.
    [ -d "seeds/$t" ] && corpora+=("seeds/$t")
    stamp=$(mktemp)
    log "fuzzing $t for ${seconds}s"
    if ! cargo fuzz run "${fuzz_flags[@]}" "$t" "${corpora[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" 2>"artifacts/$t/last.log"; then
        tail -n 60 "artifacts/$t/last.log" >&2
        echo "fuzz target $t FAILED; crashing input(s):" >&2
        find "$PWD/artifacts/$t" -type f -newer "$stamp" ! -name last.log >&2
        echo "reproduce: (cd fuzz && cargo fuzz run ${fuzz_flags[*]} $t <input>)" >&2
        rm -f "$stamp"
        exit 1
    fi
    rm -f "$stamp"
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "artifacts/$t/last.log" >&2 || true
done
log "fuzzing passed: ${targets[*]}"
