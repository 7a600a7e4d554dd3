#!/usr/bin/env bash
# Smoke test for the QEMU built by scripts/qemu-build.sh: start a q35 guest
# (TCG, stopped with -S) with an edu device, ask QMP for the PCI bus, check
# that edu (1234:11e8) is on it, and quit. QEMU always runs under `timeout`
# and is killed on any exit path, so nothing is left behind.
#
# Usage: scripts/qemu-smoke.sh [path/to/qemu-system-x86_64]
# Env:   PVDMA_SMOKE_TIMEOUT  seconds before QEMU is killed (default 60)
#        PVDMA_SMOKE_ACCEL    accelerator: tcg (default) or kvm (needs /dev/kvm)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
qemu=${1:-$("$here/qemu-build.sh" | tail -n1)}
limit=${PVDMA_SMOKE_TIMEOUT:-60}
accel=${PVDMA_SMOKE_ACCEL:-tcg}

log() { printf '[qemu-smoke] %s\n' "$*" >&2; }

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
import json, socket, sys, time

path, limit = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + limit
while True:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(max(1.0, deadline - time.monotonic()))
        s.connect(path)
        break
    except OSError:
        s.close()
        if time.monotonic() > deadline:
            sys.exit("QMP socket never appeared")
        time.sleep(0.1)
f = s.makefile("rw")

def reply():
    # Skip asynchronous events; return the next command response.
    while True:
        line = f.readline()
        if not line:
            sys.exit("QMP connection closed")
        msg = json.loads(line)
        if "return" in msg or "error" in msg:
            return msg

def cmd(name):
    f.write(json.dumps({"execute": name}) + "\n")
    f.flush()
    msg = reply()
    if "error" in msg:
        sys.exit(f"{name}: {msg['error']}")
    return msg["return"]

greeting = json.loads(f.readline())
print("QMP greeting: QEMU", greeting["QMP"]["version"]["qemu"], file=sys.stderr)
cmd("qmp_capabilities")
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
