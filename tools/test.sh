#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs every test of the project: formatting, lints, Rust unit, property,
# stress and integration tests, the loom model check, the C API tests under
# meson (with the header drift check), the QEMU side, and short fuzz runs.
# The QEMU side builds the patched QEMU (about 4.5 min when the cache is cold
# or the series changed, seconds after), checks the patch series, runs the
# smoke tests, run.sh's DMA demo, QEMU's own qtest for the device,
# pvdma-test, the unit test of the KVM exit handler, test-pvdma-kvm, the
# libvirt patch series with libvirt's own tests (libvirt 9.0.0 built in the
# cache, about 5 min when cold), a libvirt domain with pvdma (a private
# session libvirtd; installs libvirt) from <qemu:commandline> with the
# system's libvirt and from <iommu model='pvdma'> with the patched one,
# checkpatch --strict on the guest kernel code, and Debian 6.1, 6.12 and 7.2
# guests doing disk and network I/O with pvdma as their IOMMU
# (guest-io-test.sh: lazy, strict, a refused DMA, the root-port topology
# with hotplug, and two controls), the guest driver's DKMS package (installed
# here, built for every guest kernel, booted; dkms-test.sh), domain switches under DMA and the
# shutdown hook (guest-switch-test.sh), the
# vhost-user-blk backend's disk in such a guest (vhost-user-blk-test.sh),
# that backend SIGKILLed and restarted under the guest's checked I/O on
# every guest kernel, behind pvdma and without an IOMMU
# (vhost-user-blk-restart-test.sh), and vfio-pci behind pvdma in a nested
# guest (vfio-nested-test.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"

ensure_rust_build_deps

# Each step is a suite; set -e stops at the first that fails, and the EXIT
# trap then reports it, so the last line always says what ran.
steps_done=0
current=""
step() {
    [ -n "$current" ] && steps_done=$((steps_done + 1))
    current=$*
    log "$*"
}
report() {
    local rc=$?
    if [ "$rc" -eq 0 ]; then
        [ -n "$current" ] && steps_done=$((steps_done + 1))
        echo "test steps: $steps_done passed, 0 failed"
    else
        echo "FAILED in step: $current" >&2
        echo "test steps: $steps_done passed, 1 failed"
    fi
}
trap report EXIT

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace

if [ -x tools/loom.sh ]; then
    step "loom model check"
    tools/loom.sh
fi

step "tools: the guest kernel build is chosen by series (fake apt)"
tests/tools/guest-kernel-select-test.sh

if [ -f meson.build ]; then
    step "meson test (C API, header drift)"
    builddir="$PVDMA_ROOT/build/meson"
    [ -d "$builddir" ] || meson setup "$builddir" >/dev/null
    meson test -C "$builddir" --print-errorlogs
fi

# The QEMU side: the patched QEMU builds (cached; a few minutes when the
# series changed), qemu-glue/ and patches/ agree and pass checkpatch, and
# the device answers. PVDMA_SKIP_QEMU=1 skips it.
if [ "${PVDMA_SKIP_QEMU:-0}" != 1 ] && [ -x tools/qemu-build.sh ]; then
    step "QEMU: build the patched QEMU"
    qemu=$(tools/qemu-build.sh | tail -n1)
    step "QEMU: patch series agrees with qemu-glue, checkpatch"
    tools/check-patches.sh
    step "QEMU: smoke tests"
    tests/qemu/qemu-smoke.sh "$qemu"
    tests/qemu/qemu-pvdma-smoke.sh "$qemu"
    step "QEMU: run.sh's demo (edu DMA through pvdma under TCG)"
    /usr/bin/python3 tools/pvdma-demo.py "$qemu" 120 >&2
    step "QEMU: qtest pvdma-test, unit test test-pvdma-kvm (KVM exit handler)"
    tests/qemu/qemu-qtest.sh pvdma-test unit/test-pvdma-kvm
    step "libvirt: the pvdma series (patches/libvirt) builds and passes libvirt's tests"
    tests/qemu/libvirt-series-test.sh
    step "QEMU: libvirt starts a domain with pvdma from <qemu:commandline>"
    tests/qemu/libvirt-check.sh "$qemu"
    step "libvirt: the patched libvirtd runs a domain with <iommu model='pvdma'> (native XML)"
    tests/qemu/libvirt-check.sh --native "$qemu"
    step "QEMU: a Debian 12 guest maps and DMAs through the doorbell (TCG)"
    tests/guest/guest-demo.sh "$qemu"
    step "guest driver: checkpatch --strict (kernel 6.12's checkpatch.pl)"
    tools/check-guest-driver.sh
    step "QEMU: 6.1, 6.12 and 7.2 guests do disk and network I/O through pvdma_iommu.ko"
    tests/guest/guest-io-test.sh "$qemu"
    step "guest driver: the DKMS package builds it for 6.1, 6.12 and 7.2, a 6.1 guest runs on it"
    tests/tools/dkms-test.sh "$qemu"
    step "QEMU: domain switches under DMA and shutdown in 6.1, 6.12 and 7.2 guests"
    tests/guest/guest-switch-test.sh "$qemu"
    step "QEMU: vhost-user-blk through pvdma (pvdma-vhost-user-blk, both access modes)"
    tests/guest/vhost-user-blk-test.sh "$qemu"
    # QEMU reconnects (reconnect-ms) to a new backend after each SIGKILL and
    # one graceful SIGTERM, under mixed I/O with every byte checked.
    step "QEMU: vhost-user-blk backend killed and restarted under I/O, nothing lost (6.1, 6.12, 7.2)"
    tests/guest/vhost-user-blk-restart-test.sh "$qemu"
    step "QEMU: an assigned device (vfio-pci) behind pvdma, nested under TCG"
    VFIO_NESTED_STRICT=1 tests/guest/vfio-nested-test.sh "$qemu"
fi

if [ -x tools/fuzz.sh ]; then
    step "fuzz (short runs)"
    tools/fuzz.sh short
fi

log "all tests passed"
