#!/usr/bin/env bash
# Smoke test for the QEMU built by tools/qemu-build.sh: start a q35 guest
# (TCG, stopped with -S) with an edu device, ask QMP for the PCI bus, check
# that edu (1234:11e8) is on it, and quit. QEMU always runs under `timeout`
# and is killed on any exit path, so nothing is left behind.
#
# Usage: tests/qemu/qemu-smoke.sh [path/to/qemu-system-x86_64]
# Env:   PVDMA_SMOKE_TIMEOUT  seconds before QEMU is killed (default 60)
#        PVDMA_SMOKE_ACCEL    accelerator: tcg (default) or kvm (needs /dev/kvm)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PVDMA_TAG=qemu-smoke
. "$here/../framework/lib.sh"
qemu=${1:-$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)}
limit=${PVDMA_SMOKE_TIMEOUT:-60}
accel=${PVDMA_SMOKE_ACCEL:-tcg}


tmp=$(mktemp -d)
qemu_pid=
cleanup() {
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

sock=$tmp/qmp.sock
# Firmware (bios-256k.bin, option ROMs) is found through the build's
# --firmwarepath; PVDMA_QEMU_EXTRA_ARGS can add e.g. "-L DIR".
# shellcheck disable=SC2086
timeout --kill-after=5 "$limit" "$qemu" \
    -M q35 -accel "$accel" -nographic -S \
    -device edu \
    -qmp "unix:$sock,server=on,wait=off" \
    ${PVDMA_QEMU_EXTRA_ARGS:-} \
    </dev/null >"$tmp/console.log" 2>&1 &
qemu_pid=$!

/usr/bin/python3 - "$sock" "$limit" <<'PY'
import sys, time
from pvdma_qemu import QMP, exit_on_error

path, limit = sys.argv[1], float(sys.argv[2])
qmp = exit_on_error(QMP.connect, path, time.monotonic() + limit)

def cmd(name):
    return exit_on_error(qmp.execute, name)

greeting = qmp.greeting
print("QMP greeting: QEMU", greeting["QMP"]["version"]["qemu"], file=sys.stderr)
found = [
    d for bus in cmd("query-pci") for d in bus["devices"]
    if d["id"]["vendor"] == 0x1234 and d["id"]["device"] == 0x11e8
]
if not found:
    sys.exit("edu (1234:11e8) not on the PCI bus")
d = found[0]
print(f"edu found at {d['bus']:02x}:{d['slot']:02x}.{d['function']}", file=sys.stderr)
print("status:", cmd("query-status")["status"], file=sys.stderr)
cmd("quit")
PY

rc=0
wait "$qemu_pid" || rc=$?
qemu_pid=
if ((rc != 0)); then
    log "QEMU exited with $rc; console:"
    cat "$tmp/console.log" >&2
    exit 1
fi
log "PASS ($accel)"
