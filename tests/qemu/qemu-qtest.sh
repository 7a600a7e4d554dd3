#!/usr/bin/env bash
# Run QEMU qtests for x86_64 from the cached build (tools/qemu-build.sh).
#
# Usage: tests/qemu/qemu-qtest.sh [TEST...]   e.g. intel-iommu-test pvpanic-pci-test
#        tests/qemu/qemu-qtest.sh unit/test-pvdma-kvm   # a tests/unit test
#        tests/qemu/qemu-qtest.sh             # the whole qtest-x86_64 suite
# Naming tests builds just their binaries (seconds) instead of every default
# target, then runs them through `meson test` with QEMU's own test setup.
set -euo pipefail

. "$(dirname "$0")/../framework/lib.sh"
bin=$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)
build=$(dirname "$bin")
meson=$build/pyvenv/bin/meson

if (($#)); then
    targets=() names=()
    for t in "$@"; do
        case $t in
        unit/*)
            targets+=("tests/$t")
            names+=("${t#unit/}")
            ;;
        *)
            t=${t#qtest-x86_64/}
            targets+=("tests/qtest/$t")
            names+=("qtest-x86_64/$t")
            ;;
        esac
    done
    ninja -C "$build" -j"${PVDMA_JOBS:-2}" "${targets[@]}" >&2
    exec timeout 1800 "$meson" test -C "$build" --no-rebuild --print-errorlogs "${names[@]}"
fi
exec timeout 3600 "$meson" test -C "$build" --print-errorlogs --suite qtest-x86_64
