#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs libvirt's own tests on libvirt 9.0.0 with patches/libvirt/ applied
# (tools/libvirt-build.sh builds it, cached): the domain XML schema check
# and the QEMU driver tests that the series adds cases to (XML to command
# line with its failure cases, XML round trip, memory locking limits) or
# could break (capabilities, domain capabilities), and libvirt's
# syntax-check suite, with `meson test` under nice (the machine is shared).
#
# Usage: tests/qemu/libvirt-series-test.sh
# Env:   PVDMA_LIBVIRT_TESTS  the meson tests to run (default below)
set -euo pipefail
. "$(dirname "$0")/../framework/lib.sh"

TESTS=${PVDMA_LIBVIRT_TESTS:-"virschematest qemuxml2argvtest qemuxml2xmltest qemumemlocktest qemucapabilitiestest domaincapstest"}

build=$("$PVDMA_ROOT/tools/libvirt-build.sh" | tail -n1)
log "libvirt build: $build"
# shellcheck disable=SC2086 # a list of test names
nice -n 10 meson test -C "$build" --no-rebuild --print-errorlogs $TESTS >&2 ||
    die "libvirt's tests failed (log: $build/meson-logs/testlog.txt)"
nice -n 10 meson test -C "$build" --no-rebuild --print-errorlogs --suite syntax-check >&2 ||
    die "libvirt's syntax-check failed (log: $build/meson-logs/testlog.txt)"
log "libvirt series: PASS ($TESTS, syntax-check)"
