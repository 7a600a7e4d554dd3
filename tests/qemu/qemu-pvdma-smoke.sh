#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Smoke test of -device pvdma in the QEMU built by tools/qemu-build.sh:
#  1. q35 under TCG, stopped (-S), with -device pvdma -device edu: QMP
#     query-pci must show 1b36:0015 with class 0x0806, query-pvdma must
#     answer with the device and edu as an endpoint, and HMP "info pvdma"
#     (through human-monitor-command) must print it;
#  2. error paths: hypercall=on under qtest and iova-bits out of range
#     refuse to start; under KVM (when /dev/kvm is usable),
#     tests/qemu/pvdma-kvm-check.py checks that the hypercall transport is
#     live exactly when the host kernel forwards the pvdma hypercall;
#  3. tests/qemu/pvdma-doorbell-check.py drives the doorbell and edu DMA
#     through the translation over the qtest protocol;
#  4. tests/qemu/pvdma-hypercall-check.py runs VMCALL/VMMCALL hypercalls from
#     a tiny firmware under TCG (CPL 0 and 3; real, 32- and 64-bit mode).
# Every QEMU runs under `timeout` and is killed on every exit path.
#
# Usage: tests/qemu/qemu-pvdma-smoke.sh [path/to/qemu-system-x86_64]
# Env:   PVDMA_SMOKE_TIMEOUT  seconds before QEMU is killed (default 60)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PVDMA_TAG=pvdma-smoke
. "$here/../framework/lib.sh"
qemu=${1:-$("$PVDMA_ROOT/tools/qemu-build.sh" | tail -n1)}
limit=${PVDMA_SMOKE_TIMEOUT:-60}


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

# --- 1. QMP ------------------------------------------------------------------
sock=$tmp/qmp.sock
timeout --kill-after=5 "$limit" "$qemu" \
    -M q35 -accel tcg -nographic -S \
    -device pvdma,id=pvdma0 -device edu \
    -qmp "unix:$sock,server=on,wait=off" \
    </dev/null >"$tmp/console.log" 2>&1 &
qemu_pid=$!

/usr/bin/python3 - "$sock" "$limit" <<'PY'
import sys, time
from pvdma_qemu import QMP, exit_on_error

path, limit = sys.argv[1], float(sys.argv[2])
qmp = exit_on_error(QMP.connect, path, time.monotonic() + limit)

def cmd(name, **args):
    return exit_on_error(qmp.execute, name, **args)

devs = [d for bus in cmd("query-pci") for d in bus["devices"]]
pv = [d for d in devs if d["id"]["vendor"] == 0x1b36 and d["id"]["device"] == 0x0015]
if not pv:
    sys.exit("pvdma (1b36:0015) not on the PCI bus")
pv = pv[0]
if pv["class_info"]["class"] != 0x0806:
    sys.exit(f"pvdma class is 0x{pv['class_info']['class']:04x}, not 0x0806")
print(f"query-pci: pvdma at {pv['bus']:02x}:{pv['slot']:02x}.{pv['function']} "
      f"class 0x{pv['class_info']['class']:04x}", file=sys.stderr)
edu = [d for d in devs if d["id"]["vendor"] == 0x1234][0]
edu_rid = f"{edu['bus']:02x}:{edu['slot']:02x}.{edu['function']}"

info = cmd("query-pvdma")
if len(info) != 1 or info[0].get("id") != "pvdma0":
    sys.exit(f"query-pvdma: unexpected answer {info}")
d = info[0]
eps = {e["requester"]: e for e in d["endpoints"]}
if edu_rid not in eps or eps[edu_rid]["attached"]:
    sys.exit(f"query-pvdma: edu {edu_rid} missing or attached: {eps}")
# TCG with hypercall=auto: the hypercall transport is live (FEATURES bit 0)
if d["iova-bits"] != 48 or d["faults"] != 0 or not d["features"] & 1:
    sys.exit(f"query-pvdma: unexpected values {d}")
print(f"query-pvdma: {d['path']}, {len(eps)} endpoints, features "
      f"0x{d['features']:x}", file=sys.stderr)

hmp = cmd("human-monitor-command", **{"command-line": "info pvdma"})
if "pvdma0" not in hmp or f"endpoint {edu_rid}" not in hmp:
    sys.exit(f"info pvdma: unexpected output:\n{hmp}")
print("info pvdma:\n" + hmp.rstrip(), file=sys.stderr)
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

# --- 2. configuration errors -------------------------------------------------
refuses() {   # [accel=ACCEL] refuses PROPS EXPECTED-MESSAGE
    local out
    if out=$(timeout --kill-after=5 "$limit" "$qemu" -M q35 \
                -accel "${accel:-tcg}" \
                -nographic -S -device "pvdma,$1" </dev/null 2>&1); then
        log "FAIL: -device pvdma,$1 started"
        exit 1
    fi
    grep -q "$2" <<<"$out" || { log "FAIL: -device pvdma,$1: $out"; exit 1; }
    log "-device pvdma,$1 refused: $(grep -m1 "$2" <<<"$out")"
}
accel=qtest refuses hypercall=on "hypercall=on needs the TCG accelerator"
# Under KVM the answer depends on the host kernel (patches/linux): the
# check asks KVM what it offers and expects QEMU to agree.
/usr/bin/python3 "$here/pvdma-kvm-check.py" "$qemu" "$limit"
refuses iova-bits=20 "iova-bits must be 21..57"
refuses iova-bits=58 "iova-bits must be 21..57"
refuses pin-mode=foo "pin-mode must be"
refuses queues=65 "queues must be 0..64, not 65"
refuses queues=-1 "queues"

# --- 3. doorbell and DMA through the translation ------------------------------
/usr/bin/python3 "$here/pvdma-doorbell-check.py" "$qemu"

# --- 4. the hypercall transport under TCG -----------------------------------
/usr/bin/python3 "$here/pvdma-hypercall-check.py" "$qemu" "$limit"

log "PASS"
