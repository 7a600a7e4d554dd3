#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Boot the nested VFIO test's L1 and watch it (tests/guest/vfio-nested-test.sh).

Usage: vfio-nested-boot.py QEMU VMLINUZ INITRD [TIMEOUT [L2_TIMEOUT]]
VFIO_NESTED_STRICT=1 makes the KNOWN-BUG and KNOWN-ISSUE cases fail.

Runs L0's QEMU (q35, TCG, Intel IOMMU with caching-mode=on and no
interrupt remapping, an edu device) under `timeout`, copies L1's console
to stdout and collects the `PVDMA-VFIO: ` lines of guest/vfio: one `PIN`
line per VmLck measurement of L2's QEMU, `KNOWN-BUG` lines, and the
verdict. Prints the pinned-memory table and the `KNOWN-BUG` and
`KNOWN-ISSUE` lines (behaviour the test shows but does not fail on) at the
end. QEMU is killed on
every exit path. Exit status 0 only when L1 printed `PVDMA-VFIO: PASS` and
QEMU exited by itself (L1 powered off).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "framework"))
from pvdma_qemu import (HOST_ERRORS, ConsoleMachine,  # noqa: E402
                        exit_verdict, host_failure,
                        interrupt_on_signals)

MARK = "PVDMA-VFIO: "
BIOS = os.environ.get("PVDMA_GUEST_BIOS", "qboot.rom")


def log(msg=""):
    print(msg, flush=True)


def l0_args(kernel, initrd, l2_timeout, strict):
    # intel-iommu must come before the devices it translates.
    return ["-M", "q35", "-accel", "tcg", "-m", "1G", "-smp", "2",
            "-no-reboot", "-nic", "none", "-vga", "none",
            *(["-bios", BIOS] if BIOS else []),
            "-device", "intel-iommu,caching-mode=on,intremap=off",
            "-device", "edu,id=edu0,addr=04.0",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1 intel_iommu=on "
                       f"pvdmavfio.l2_timeout={l2_timeout}"
                       + (" pvdmavfio.strict=1" if strict else "")]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    interrupt_on_signals()
    qemu, kernel, initrd = sys.argv[1:4]
    limit = float(sys.argv[4]) if len(sys.argv) > 4 else 120
    l2_timeout = int(sys.argv[5]) if len(sys.argv) > 5 else 60
    strict = os.environ.get("VFIO_NESTED_STRICT", "") not in ("", "0")
    pins, bugs, times = [], [], {}
    passed, failure, vm = False, None, None
    try:
        vm = ConsoleMachine(qemu, l0_args(kernel, initrd, l2_timeout, strict), limit)
        log("$ " + " ".join(vm.argv[3:]))
        for line in vm.lines():
            print(line, flush=True)
            at = line.find(MARK)
            if at < 0:
                continue
            rest = line[at + len(MARK):]
            word = rest.split(" ", 1)[0]
            now = round(vm.elapsed(), 1)
            if word == "BOOTED":
                times["booted"] = now
            elif word == "PIN":
                label, _, kb = rest[4:].rpartition(": ")
                pins.append((label, kb))
            elif word in ("KNOWN-BUG", "KNOWN-ISSUE"):
                bugs.append(rest)
            elif word == "PASS":
                times["result"] = now
                passed = True
            elif word == "FAIL" and failure is None:
                times["result"] = now
                failure = rest
        if failure is None:
            failure = exit_verdict(vm, limit, passed, "L1")
    except HOST_ERRORS as e:
        failure = host_failure(e)
    finally:
        if vm is not None:
            vm.close()
    total = round(vm.elapsed(), 1) if vm is not None else "?"
    if pins:
        log("\n== L2 QEMU's VmLck in L1 (what VFIO, and pvdma's mlock, pinned)")
        width = max(len(label) for label, _ in pins)
        for label, kb in pins:
            log(f"  {label:<{width}}  {kb:>12}")
    for bug in bugs:
        log(bug)
    log(f"\n== timing: QEMU start -> L1 /init {times.get('booted', '?')} s,"
        f" -> result {times.get('result', '?')} s, -> QEMU exit {total} s")
    if passed and failure is None:
        log("vfio-nested-test: PASS")
        return 0
    log(f"vfio-nested-test: FAIL: {failure}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
