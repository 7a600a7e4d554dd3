#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Check -device pvdma's hypercall transport set-up under KVM.

The transport is live under KVM only when the host kernel forwards the
pvdma hypercall (KVM_HC_PVDMA = 30) to QEMU, that is when
KVM_CHECK_EXTENSION(KVM_CAP_EXIT_HYPERCALL) offers bit 30 (a kernel with
patches/linux). This asks the kernel itself, then checks that QEMU agrees:

  * hypercall=auto: FEATURES.HYPERCALL is set exactly when bit 30 is
    offered, and HYPERCALL_NR reads 30 then, 0x50444d41 ("PDMA") otherwise;
    a QUERY through the doorbell works either way;
  * hypercall=on: QEMU starts when bit 30 is offered, and otherwise refuses
    with the error that names KVM_CAP_EXIT_HYPERCALL;
  * hypercall=off: FEATURES.HYPERCALL clear, HYPERCALL_NR 0x50444d41.

Registers are read over the qtest protocol with -accel kvm, so no guest
code runs (on hosts whose KVM cannot boot a guest kernel this still works).
Exits 0 with a "skipped" line when /dev/kvm is missing or not usable.

usage: pvdma-kvm-check.py QEMU_BINARY [TIMEOUT]
"""

import fcntl
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "framework"))
from pvdma_qemu import (OP_QUERY, PVDMA_DEVICE, PVDMA_VENDOR, REG_FEATURES,
                        STATUS, QemuError, QTestMachine, request)

KVM_CHECK_EXTENSION = 0xAE03           # _IO(KVMIO, 0x03)
KVM_CAP_EXIT_HYPERCALL = 201
KVM_HC_PVDMA = 30
TCG_NR = 0x50444D41
REG_HYPERCALL_NR = 0x20
FEATURE_HYPERCALL = 1
PVDMA_BAR = 0xC0000000
BLOCK = 0x100000
MACHINE = ["-M", "q35", "-m", "128M", "-accel", "kvm", "-nographic", "-S",
           "-display", "none", "-serial", "none", "-monitor", "none"]


def log(msg):
    print(f"[pvdma-kvm] {msg}", file=sys.stderr)


def check(cond, what):
    if not cond:
        sys.exit(f"[pvdma-kvm] FAIL: {what}")


def kvm_exit_hypercall_mask():
    """The host kernel's KVM_CAP_EXIT_HYPERCALL mask, or None without KVM."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        log(f"skipped: /dev/kvm not usable ({e.strerror})")
        return None
    try:
        return max(fcntl.ioctl(fd, KVM_CHECK_EXTENSION,
                               KVM_CAP_EXIT_HYPERCALL), 0)
    finally:
        os.close(fd)


def registers(qemu, prop, limit):
    """FEATURES, HYPERCALL_NR and a doorbell QUERY's status under KVM."""
    qt = QTestMachine(qemu, MACHINE + ["-device", f"pvdma,{prop}"],
                      timeout=limit, connect_timeout=limit)
    try:
        qt.connect()
        pv = qt.find(PVDMA_VENDOR, PVDMA_DEVICE)
        qt.cfg_write(pv, 0x10, PVDMA_BAR)
        qt.cfg_write(pv, 0x04, 0x2)            # memory decode
        features = qt.readq(PVDMA_BAR + REG_FEATURES)
        nr = qt.readl(PVDMA_BAR + REG_HYPERCALL_NR)
        status = request(qt, PVDMA_BAR, BLOCK, OP_QUERY, 0)[0]
        return features, nr, status
    except (OSError, QemuError) as e:
        sys.exit(f"[pvdma-kvm] FAIL: pvdma,{prop} under KVM: {e}\n"
                 f"{qt.close()}")
    finally:
        qt.close()


def starts(qemu, prop, limit):
    """(started, output) for QEMU -S with -device pvdma,PROP, then quit."""
    p = subprocess.run(
        ["timeout", "--kill-after=5", str(limit), qemu, *MACHINE,
         "-device", f"pvdma,{prop}", "-qmp", "stdio"],
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        capture_output=True, text=True)
    return p.returncode == 0 and '"return"' in p.stdout, p.stdout + p.stderr


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    qemu = sys.argv[1]
    limit = int(sys.argv[2]) if len(sys.argv) == 3 else 60
    mask = kvm_exit_hypercall_mask()
    if mask is None:
        return
    live = bool(mask & (1 << KVM_HC_PVDMA))
    log(f"KVM_CAP_EXIT_HYPERCALL offers 0x{mask:x}: the pvdma hypercall "
        f"{'is' if live else 'is not'} forwarded by this kernel")

    features, nr, status = registers(qemu, "hypercall=auto", limit)
    log(f"hypercall=auto: FEATURES 0x{features:x}, HYPERCALL_NR 0x{nr:x}, "
        f"doorbell QUERY {STATUS.get(status, status)}")
    check(bool(features & FEATURE_HYPERCALL) == live,
          "hypercall=auto: FEATURES.HYPERCALL disagrees with the kernel")
    check(nr == (KVM_HC_PVDMA if live else TCG_NR),
          f"hypercall=auto: HYPERCALL_NR 0x{nr:x}")
    check(status == 0, "doorbell QUERY under KVM")

    features, nr, _ = registers(qemu, "hypercall=off", limit)
    check(not features & FEATURE_HYPERCALL and nr == TCG_NR,
          f"hypercall=off: FEATURES 0x{features:x}, HYPERCALL_NR 0x{nr:x}")

    ok, out = starts(qemu, "hypercall=on", limit)
    if live:
        check(ok, f"hypercall=on refused on a kernel that offers it: {out}")
        log("hypercall=on: started")
    else:
        want = "forwards the pvdma hypercall to QEMU"
        check(not ok and want in out and "KVM_CAP_EXIT_HYPERCALL" in out,
              f"hypercall=on on a stock kernel: {out}")
        log("hypercall=on refused: " +
            next(line for line in out.splitlines() if want in line))
    log("PASS")


if __name__ == "__main__":
    main()
