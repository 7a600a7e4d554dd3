# shellcheck shell=bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Sourced by the shell tests under tests/: the project's shell library
# (tools/lib.sh: PVDMA_ROOT, log, die, ensure_*), the guest artefact helpers
# (tools/guest-lib.sh: pinned Debian kernels, busybox, modules), and the
# Python framework on PYTHONPATH (pvdma_qemu: the one QMP/qtest client;
# pvdma_guest: guest boots with pvdma_iommu.ko).
# shellcheck source=../../tools/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../tools/lib.sh"
# shellcheck source=../../tools/guest-lib.sh
. "$PVDMA_ROOT/tools/guest-lib.sh"
PVDMA_FRAMEWORK="$PVDMA_ROOT/tests/framework"
export PYTHONPATH="$PVDMA_FRAMEWORK${PYTHONPATH:+:$PYTHONPATH}"

# A series of guest boots with a one-line summary each (the boot scripts'
# --summary-file). boots_begin NAME: a fresh summary and the traps that end
# a running boot on exit or signal. boot_run LABEL CMD...: runs CMD with
# --summary-file appended, in the background so that SIGTERM reaches it
# (the boot scripts end their QEMU on it); a failed boot that wrote no
# line gets "LABEL: no result". boots_end: prints the summary, then
# "NAME: PASS", or "NAME: FAIL" and exit status 1.
boots_begin() {
    BOOTS_NAME=$1
    BOOTS_SUMMARY=$(mktemp)
    BOOTS_FAILED=0
    BOOTS_PID=
    trap _boots_cleanup EXIT
    trap 'exit 143' TERM HUP
    trap 'exit 130' INT
}

_boots_cleanup() {
    [ -z "$BOOTS_PID" ] || { kill -TERM "$BOOTS_PID" 2>/dev/null; wait "$BOOTS_PID" 2>/dev/null; }
    rm -f "$BOOTS_SUMMARY"
}

boot_run() {
    local label=$1 rc=0 before
    shift
    before=$(wc -l <"$BOOTS_SUMMARY")
    "$@" --summary-file "$BOOTS_SUMMARY" &
    BOOTS_PID=$!
    wait "$BOOTS_PID" || rc=$?
    BOOTS_PID=
    if [ $rc -ne 0 ]; then
        BOOTS_FAILED=1
        [ "$(wc -l <"$BOOTS_SUMMARY")" -gt "$before" ] ||
            echo "$label: no result (status $rc)" >>"$BOOTS_SUMMARY"
    fi
}

boots_end() {
    log "summary"
    cat "$BOOTS_SUMMARY"
    if [ "$BOOTS_FAILED" -ne 0 ]; then
        echo "$BOOTS_NAME: FAIL"
        exit 1
    fi
    echo "$BOOTS_NAME: PASS"
}

# vub_prepare [QEMU_BINARY]: for the vhost-user-blk guest tests, sets qemu
# (the argument, else the cached patched build; it must have
# vhost-user-blk-pci) and backend (a debug build of pvdma-vhost-user-blk).
vub_prepare() {
    ensure_apt python3 coreutils
    if [ $# -ge 1 ]; then
        qemu=$1
    else
        qemu=$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)
    fi
    [ -x "$qemu" ] || { echo "not an executable: $qemu" >&2; exit 1; }
    if ! "$qemu" -device help 2>/dev/null | grep -q '"vhost-user-blk-pci"'; then
        echo "$qemu has no vhost-user-blk-pci (built without --enable-vhost-user?)" >&2
        exit 1
    fi
    log "building pvdma-vhost-user-blk"
    (cd "$PVDMA_ROOT" && cargo build --quiet -p pvdma-vhost-user-blk --bin pvdma-vhost-user-blk)
    backend="$PVDMA_ROOT/target/debug/pvdma-vhost-user-blk"
}
