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

wanted=()
for t in "$@"; do wanted+=("qtest-x86_64/${t#qtest-x86_64/}"); done

# The meson test arguments for BUILD, one a line: the whole suite, or the
# named tests that BUILD has (pvdma-test exists only in the patched one).
select_tests() {   # select_tests BUILD
    if ((${#wanted[@]} == 0)); then
        printf '%s\n' --suite qtest-x86_64
        return
    fi
    local have t
    have=$(python3 "$here/qtest-suite-deps.py" --names "$1" qtest-x86_64)
    for t in "${wanted[@]}"; do
        grep -qxF "$t" <<<"$have" && echo "$t"
    done
    return 0
}

# The tests reach KVM only through /dev/kvm (libqtest's qtest_has_accel and
# migration-test open it). As root, file modes do not stop access(), so the
# hiding runs in a private mount namespace (unshare's default, propagation
# private): an unreadable empty file is bind-mounted over /dev/kvm there and
# the DAC-override capabilities are dropped.
run_suite() {   # run_suite BUILD
    local build=$1 rc=0 names
    mapfile -t names < <(select_tests "$build")
    rm -f "$build/meson-logs/qtest-compare.json"
    if ((${#names[@]} == 0)); then
        echo "none of the named tests exists in $build"
        : >"$build/meson-logs/qtest-compare.json"
        return 0
    fi
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

if [[ ${PVDMA_QTEST_KVM:-0} != 1 && -e /dev/kvm && $(id -u) != 0 ]]; then
    die "hiding /dev/kvm needs root (a mount namespace); run as root or set PVDMA_QTEST_KVM=1"
fi
t0=$(date +%s)
log "running ${wanted[*]:-the whole qtest-x86_64 suite} on stock and patched (kvm: ${PVDMA_QTEST_KVM:-0}, multiplier $mult)"
run_suite "$stock" >"$out/stock.txt" 2>&1 &
spid=$!
run_suite "$patched" >"$out/patched.txt" 2>&1 &
ppid=$!
trap 'kill $spid $ppid 2>/dev/null || true' EXIT
wait $spid || true
wait $ppid || true
trap - EXIT
for b in stock patched; do
    dir=$stock; [[ $b == patched ]] && dir=$patched
    [[ -f $dir/meson-logs/qtest-compare.json ]] ||
        die "no meson log from the $b suite (see $out/$b.txt)"
    cp "$dir/meson-logs/qtest-compare.json" "$out/$b.json"
done
log "both suites done in $(($(date +%s) - t0))s; logs in $out"

python3 "$here/qtest-table.py" "$out/stock.json" "$out/patched.json" | tee "$out/table.md"
