#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Boot the pvdma guest demo and watch it (used by tests/guest/guest-demo.sh).

Usage: guest-demo-boot.py QEMU_BINARY VMLINUZ INITRD [TIMEOUT_SECONDS]

Runs QEMU (q35, TCG, -nographic, serial on stdio, QMP on a unix socket)
under `timeout`, copies the guest's console to stdout, and whenever the
guest prints `PVDMA-GUEST-DEMO: PAUSE <tag>` runs `query-pvdma` over QMP,
prints it, and sends the guest a line so it goes on. QEMU is killed on
every exit path. Exit status 0 only when the guest printed
`PVDMA-GUEST-DEMO: PASS` and QEMU exited by itself (guest poweroff).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "framework"))
# the scripts' shared QEMU helpers
from pvdma_qemu import (HOST_ERRORS, ConsoleMachine,  # noqa: E402
                        compact_json, exit_verdict, host_failure,
                        interrupt_on_signals)

MARK = "PVDMA-GUEST-DEMO: "
# qboot (shipped with QEMU) starts the kernel in well under a second under
# TCG, where SeaBIOS takes 30-50 s on this machine before it even loads it.
# GUEST_DEMO_BIOS= (empty) boots with QEMU's default firmware (SeaBIOS).
BIOS = os.environ.get("GUEST_DEMO_BIOS", "qboot.rom")


def log(msg=""):
    print(msg, flush=True)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    # SIGTERM/SIGHUP unwind like Ctrl-C, through the `finally` that kills QEMU.
    interrupt_on_signals()
    qemu, kernel, initrd = sys.argv[1:4]
    limit = float(sys.argv[4]) if len(sys.argv) > 4 else 120
    args = ["-M", "q35", "-accel", "tcg", "-m", "512M",
            "-no-reboot", "-nic", "none",
            *(["-bios", BIOS] if BIOS else []),
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1",
            "-device", "pvdma,id=pvdma0",
            "-device", "edu,id=edu0"]
    times = {}
    passed = False
    failure = None
    vm = None
    try:
        vm = ConsoleMachine(qemu, args, limit)
        log("$ " + " ".join(vm.argv[3:]))
        for line in vm.lines():
            print(line, flush=True)
            at = line.find(MARK)
            if at < 0:
                continue
            line = line[at:]
            word = line[len(MARK):].split()[0:2] or ["?"]
            now = round(vm.elapsed(), 1)
            if word[0] == "BOOTED":
                times["booted"] = now
            elif word[0] == "PASS":
                times["result"] = now
                passed = True
            elif word[0] == "FAIL":
                times["result"] = now
                failure = line[len(MARK):]
            elif word[0] == "PAUSE":
                tag = word[1] if len(word) > 1 else "?"
                log(f"\n== host: QMP query-pvdma ({tag})")
                log(compact_json(vm.qmp().execute("query-pvdma")))
                log("== host: guest, go on\n")
                vm.send_line()
        if failure is None:
            failure = exit_verdict(vm, limit, passed, "the guest")
    except HOST_ERRORS as e:
        failure = host_failure(e)
    finally:
        if vm is not None:
            vm.close()
    total = round(vm.elapsed(), 1) if vm is not None else "?"
    log(f"\n== timing: QEMU start -> guest /init {times.get('booted', '?')} s,"
        f" -> test result {times.get('result', '?')} s,"
        f" -> QEMU exit {total} s (includes the host's QMP queries)")
    if passed and failure is None:
        log("guest-demo: PASS")
        return 0
    log(f"guest-demo: FAIL: {failure}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
