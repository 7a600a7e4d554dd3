#!/usr/bin/env bash
# Run QEMU's whole qtest-x86_64 suite on the patched build and on a stock
# build of the same source and configure flags (tools/qemu-build.sh with
# PVDMA_QEMU_STOCK=1), then print one table: test, stock result and time,
# patched result and time.
#
# Usage: tests/qemu/qtest-compare.sh [TEST...]   (default: the whole suite)
# Env:   PVDMA_QTEST_KVM=1        let the tests see /dev/kvm (default: hidden,
#                                 so every test runs on TCG; see
#                                 docs/building-qemu.md, "The full qtest suite")
#        PVDMA_QTEST_MULTIPLIER   meson's timeout multiplier (default 1: the
#                                 per-test timeouts of tests/qtest/meson.build)
#        PVDMA_QTEST_OUT          where logs and the table go
#                                 (default build/qtest-compare)
#        PVDMA_JOBS               ninja jobs for the builds (default 2)
# Both suites run at the same time, one test at a time each, so the two
# builds see the same machine load. Exit status: 1 when the patched build
# fails (or times out on) a test that passes on stock, else 0.
set -euo pipefail

. "$(dirname "$0")/../framework/lib.sh"
here=$PVDMA_ROOT/tests/qemu
out=${PVDMA_QTEST_OUT:-$PVDMA_ROOT/build/qtest-compare}
mult=${PVDMA_QTEST_MULTIPLIER:-1}
jobs=${PVDMA_JOBS:-2}
mkdir -p "$out"

quiet() { nice -n 19 ionice -c3 "$@"; }

patched=$(dirname "$(quiet "$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)")
stock=$(dirname "$(PVDMA_QEMU_STOCK=1 quiet "$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)")

# `meson test` would first build every default target (tools, unit tests,
# everything); build only what the suite's tests depend on instead.
for b in "$stock" "$patched"; do
    mapfile -t deps < <(python3 "$here/qtest-suite-deps.py" "$b" qtest-x86_64)
    log "building ${#deps[@]} targets for the suite in $b"
    quiet ninja -C "$b" -j"$jobs" "${deps[@]}" >"$out/ninja-$(basename "$(dirname "$b")").log" 2>&1 ||
        die "building the qtests failed in $b (see $out)"
done

names=()
for t in "$@"; do names+=("qtest-x86_64/${t#qtest-x86_64/}"); done
((${#names[@]})) || names=(--suite qtest-x86_64)

# The tests reach KVM only through /dev/kvm (libqtest's qtest_has_accel and
# migration-test open it). As root, file modes do not stop access(), so the
# hiding runs in a private mount namespace (unshare's default propagation): an unreadable empty file is
# bind-mounted over /dev/kvm and the DAC-override capabilities are dropped.
run_suite() {   # run_suite NAME BUILD
    local build=$2 rc=0
    local cmd=(timeout 7200 "$build/pyvenv/bin/meson" test -C "$build" --no-rebuild
               --num-processes 1 -t "$mult" --logbase "qtest-compare" "${names[@]}")
    if [[ ${PVDMA_QTEST_KVM:-0} == 1 ]]; then
        quiet "${cmd[@]}" || rc=$?
    else
        local hide; hide=$(mktemp -d)
        : >"$hide/kvm"; chmod 000 "$hide/kvm"
        # shellcheck disable=SC2016 # expanded by the inner shell
        quiet unshare -m sh -c '
            mount --bind "$1" /dev/kvm || exit 125
            shift
            caps=-dac_override,-dac_read_search
            exec setpriv --inh-caps="$caps" --bounding-set="$caps" "$@"' \
            sh "$hide/kvm" "${cmd[@]}" || rc=$?
        rm -rf "$hide"
    fi
    return $rc
}

t0=$(date +%s)
log "running ${names[*]} on stock and patched (kvm: ${PVDMA_QTEST_KVM:-0}, multiplier $mult)"
run_suite stock "$stock" >"$out/stock.txt" 2>&1 &
spid=$!
run_suite patched "$patched" >"$out/patched.txt" 2>&1 &
ppid=$!
trap 'kill $spid $ppid 2>/dev/null || true' EXIT
wait $spid || true
wait $ppid || true
trap - EXIT
cp "$stock/meson-logs/qtest-compare.json" "$out/stock.json"
cp "$patched/meson-logs/qtest-compare.json" "$out/patched.json"
log "both suites done in $(($(date +%s) - t0))s; logs in $out"

python3 "$here/qtest-table.py" "$out/stock.json" "$out/patched.json" | tee "$out/table.md"
