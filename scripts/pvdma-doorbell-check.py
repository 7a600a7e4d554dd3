#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""End-to-end check of -device pvdma through QEMU's qtest protocol.

Plays a guest driver with no guest: programs the BARs of pvdma and edu
through PCI config space, submits QUERY/ATTACH/MAP/UNMAP request blocks
through the DOORBELL and lets edu DMA through the translation, checking
that unmapped DMA is refused (FAULTS) and mapped DMA lands where the
mapping says. The QEMU tests proper are tests/qtest/pvdma-test.c; this is
the quick check scripts/qemu-pvdma-smoke.sh runs on the built binary.

usage: pvdma-doorbell-check.py QEMU_BINARY
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

PVDMA_BAR = 0xc0000000
EDU_BAR = 0xc0100000
BLOCK = 0x100000            # request block in guest RAM
SRC_GPA = 0x200000          # data edu reads
DST_GPA = 0x300000          # where edu writes back
IOVA_SRC = 0x10000
IOVA_DST = 0x20000
QUERY, ATTACH, DETACH, MAP, UNMAP = 1, 2, 3, 4, 5
READ, WRITE, FIXED = 1, 2, 4


class QTest:
    def __init__(self, qemu, extra):
        self.tmp = tempfile.mkdtemp()
        path = os.path.join(self.tmp, "qtest.sock")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)
        srv.settimeout(30)
        self.proc = subprocess.Popen(
            ["timeout", "--kill-after=5", "60", qemu, "-M", "q35", "-m",
             "128M", "-nographic", "-qtest", f"unix:{path}", "-accel",
             "qtest", "-display", "none", "-serial", "none",
             "-monitor", "none", "-qtest-log", "/dev/null", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        self.sock, _ = srv.accept()
        srv.close()
        self.f = self.sock.makefile("rw")

    def cmd(self, line):
        self.f.write(line + "\n")
        self.f.flush()
        while True:
            r = self.f.readline()
            if not r:
                sys.exit(f"qtest: connection closed after {line!r}")
            if r.startswith("IRQ"):
                continue
            if not r.startswith("OK"):
                sys.exit(f"qtest: {line!r} -> {r.strip()}")
            parts = r.split()
            return int(parts[1], 16) if len(parts) > 1 else None

    def close(self):
        try:
            self.sock.close()
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        return self.proc.stdout.read().decode(errors="replace")

    # PCI config space through the 0xcf8/0xcfc mechanism
    def cfg_addr(self, devfn, reg):
        self.cmd(f"outl 0xcf8 0x{0x80000000 | devfn << 8 | reg:x}")

    def cfg_read(self, devfn, reg):
        self.cfg_addr(devfn, reg & ~3)
        return self.cmd("inl 0xcfc")

    def cfg_write(self, devfn, reg, val):
        self.cfg_addr(devfn, reg)
        self.cmd(f"outl 0xcfc 0x{val:x}")

    def find(self, vendor, device):
        for devfn in range(256):
            if self.cfg_read(devfn, 0) == (device << 16 | vendor):
                return devfn
        sys.exit(f"{vendor:04x}:{device:04x} not found")

    def mem_write(self, addr, data):
        self.cmd(f"write 0x{addr:x} 0x{len(data):x} 0x{data.hex()}")

    def mem_read(self, addr, size):
        self.f.write(f"read 0x{addr:x} 0x{size:x}\n")
        self.f.flush()
        r = self.f.readline().split()
        return bytes.fromhex(r[1][2:])


def request(qt, op, requester, flags=0, iova=0, length=0, segs=()):
    blk = struct.pack("<HHIIIQQQ24x", op, flags, 0xffffffff, requester,
                      len(segs), iova, length, 0)
    for gpa, ln in segs:
        blk += struct.pack("<QQ", gpa, ln)
    qt.mem_write(BLOCK, blk)
    qt.cmd(f"writeq 0x{PVDMA_BAR + 0x28:x} 0x{BLOCK:x}")
    status = qt.cmd(f"readl 0x{PVDMA_BAR + 0x38:x}")
    hdr = qt.mem_read(BLOCK, 40)
    _, _, st, _, _, iova_out, len_out, result = struct.unpack("<HHIIIQQQ", hdr)
    if st != status:
        sys.exit(f"op {op}: block status {st} != LAST_STATUS {status}")
    return status, iova_out, len_out, result


def edu_dma(qt, src, dst, count, to_pci):
    qt.cmd(f"writeq 0x{EDU_BAR + 0x80:x} 0x{src:x}")
    qt.cmd(f"writeq 0x{EDU_BAR + 0x88:x} 0x{dst:x}")
    qt.cmd(f"writeq 0x{EDU_BAR + 0x90:x} 0x{count:x}")
    qt.cmd(f"writeq 0x{EDU_BAR + 0x98:x} 0x{1 | (2 if to_pci else 0):x}")
    qt.cmd("clock_step 200000000")          # edu runs DMA from a 100 ms timer


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, file=sys.stderr)
    if not cond:
        sys.exit(1)


def main():
    qemu = sys.argv[1]
    qt = QTest(qemu, ["-device", "pvdma", "-device", "edu"])
    try:
        pv = qt.find(0x1b36, 0x0015)
        edu = qt.find(0x1234, 0x11e8)
        check(qt.cfg_read(pv, 8) == 0x08060001, "class 0x080600 rev 1")
        qt.cfg_write(pv, 0x10, PVDMA_BAR)
        qt.cfg_write(pv, 0x04, 0x2)
        qt.cfg_write(edu, 0x10, EDU_BAR)
        qt.cfg_write(edu, 0x04, 0x6)          # memory + bus master

        check(qt.cmd(f"readl 0x{PVDMA_BAR:x}") == 0x414d4450, "MAGIC")
        check(qt.cmd(f"readl 0x{PVDMA_BAR + 4:x}") == 1, "VERSION")
        check(qt.cmd(f"readq 0x{PVDMA_BAR + 8:x}") == 6, "FEATURES")
        check(qt.cmd(f"readl 0x{PVDMA_BAR + 0x10:x}") == 48, "IOVA_BITS")
        check(qt.cmd(f"readl 0x{PVDMA_BAR + 0x14:x}") >= 252, "MAX_SEGS")
        check(qt.cmd(f"readq 0x{PVDMA_BAR + 0x18:x}") & 0x1000, "PAGE_SIZES")
        check(qt.cmd(f"readl 0x{PVDMA_BAR + 0x800:x}") == 0, "undefined reads 0")

        st, _, _, res = request(qt, QUERY, edu)
        check(st == 0 and res == 4, f"QUERY edu: OK, bypass (status {st}, result {res})")
        st, *_ = request(qt, QUERY, pv)
        check(st == 2, f"QUERY pvdma itself: NODEV ({st})")

        pattern = bytes(range(256)) * 4
        qt.mem_write(SRC_GPA, pattern)
        st, *_ = request(qt, ATTACH, edu)
        check(st == 0, f"ATTACH edu ({st})")
        faults0 = qt.cmd(f"readq 0x{PVDMA_BAR + 0x30:x}")
        edu_dma(qt, IOVA_SRC, 0x40000, len(pattern), to_pci=False)
        faults1 = qt.cmd(f"readq 0x{PVDMA_BAR + 0x30:x}")
        check(faults1 > faults0, f"unmapped DMA refused (FAULTS {faults0} -> {faults1})")

        st, iova, ln, _ = request(qt, MAP, edu, READ | FIXED, IOVA_SRC,
                                  segs=[(SRC_GPA, 4096)])
        check(st == 0 and iova == IOVA_SRC and ln == 4096, f"MAP src read-only ({st})")
        st, iova, _, _ = request(qt, MAP, edu, WRITE, segs=[(DST_GPA, 4096)])
        check(st == 0 and iova != 0, f"MAP dst write, host-chosen IOVA 0x{iova:x} ({st})")
        iova_dst = iova

        edu_dma(qt, IOVA_SRC, 0x40000, len(pattern), to_pci=False)
        edu_dma(qt, 0x40000, iova_dst, len(pattern), to_pci=True)
        check(qt.mem_read(DST_GPA, len(pattern)) == pattern,
              "edu DMA through the mappings copied the data")
        faults2 = qt.cmd(f"readq 0x{PVDMA_BAR + 0x30:x}")
        edu_dma(qt, 0x40000, IOVA_SRC, 16, to_pci=True)
        check(qt.cmd(f"readq 0x{PVDMA_BAR + 0x30:x}") > faults2,
              "write to a read-only mapping refused")

        st, _, _, res = request(qt, UNMAP, edu, iova=IOVA_SRC)
        check(st == 0 and res == 4096, f"UNMAP ({st}, {res})")
        st, _, _, res = request(qt, DETACH, edu)
        check(st == 0 and res == 1, f"DETACH removed 1 mapping ({st}, {res})")
        st, _, _, res = request(qt, QUERY, edu)
        check(st == 0 and res == 4, "QUERY after DETACH: bypass again")

        # 32-bit doorbell: low half latched, high half triggers
        qt.mem_write(BLOCK, struct.pack("<HHIIIQQQ24x", QUERY, 0, 0xffffffff,
                                        edu, 0, 0, 0, 0))
        qt.cmd(f"writel 0x{PVDMA_BAR + 0x28:x} 0x{BLOCK:x}")
        qt.cmd(f"writel 0x{PVDMA_BAR + 0x2c:x} 0x0")
        check(struct.unpack("<I", qt.mem_read(BLOCK + 4, 4))[0] == 0,
              "32-bit doorbell pair")
    finally:
        out = qt.close()
    if out.strip():
        print(out, file=sys.stderr)
    print("PASS", file=sys.stderr)


if __name__ == "__main__":
    main()
