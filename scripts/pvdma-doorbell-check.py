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

import json
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
        self.qmp_path = os.path.join(self.tmp, "qmp.sock")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)
        srv.settimeout(30)
        self.proc = subprocess.Popen(
            ["timeout", "--kill-after=5", "60", qemu, "-M", "q35", "-m",
             "128M", "-nographic", "-qtest", f"unix:{path}", "-accel",
             "qtest", "-display", "none", "-serial", "none",
             "-monitor", "none", "-qtest-log", "/dev/null",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        self.sock, _ = srv.accept()
        srv.close()
        self.f = self.sock.makefile("rw")
        self.qmp_sock = socket.socket(socket.AF_UNIX)
        self.qmp_sock.connect(self.qmp_path)
        self.q = self.qmp_sock.makefile("rw")
        json.loads(self.q.readline())
        self.qmp("qmp_capabilities")

    def qmp(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.q.write(json.dumps(msg) + "\n")
        self.q.flush()
        while True:
            r = json.loads(self.q.readline())
            if "error" in r:
                sys.exit(f"QMP {name}: {r['error']}")
            if "return" in r:
                return r["return"]

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
            self.qmp_sock.close()
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


def setup(qt):
    pv = qt.find(0x1b36, 0x0015)
    edu = qt.find(0x1234, 0x11e8)
    qt.cfg_write(pv, 0x10, PVDMA_BAR)
    qt.cfg_write(pv, 0x04, 0x2)
    qt.cfg_write(edu, 0x10, EDU_BAR)
    qt.cfg_write(edu, 0x04, 0x6)          # memory + bus master
    return pv, edu


def wait_migration(qt):
    for _ in range(300):
        status = qt.qmp("query-migrate").get("status")
        if status in ("completed", "failed"):
            return status
        time.sleep(0.1)
    return "timeout"


def main():
    qemu = sys.argv[1]
    devices = ["-device", "pvdma", "-device", "edu",
               "-device", "pcie-root-port,id=rp1,chassis=1,addr=0x10",
               "-device", "edu,bus=rp1"]
    qt = QTest(qemu, devices)
    try:
        pv, edu = setup(qt)
        check(qt.cfg_read(pv, 8) == 0x08060001, "class 0x080600 rev 1")

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

        # A function behind a root port has an ID once its bus has a number
        rp = 0x10 << 3
        st, *_ = request(qt, QUERY, 0x0500)
        check(st == 2, f"QUERY 05:00.0 before bus numbering: NODEV ({st})")
        qt.cfg_write(rp, 0x18, 0x050500)    # primary 0, secondary 5, sub 5
        st, _, _, res = request(qt, QUERY, 0x0500)
        check(st == 0 and res == 4, f"QUERY 05:00.0 behind the root port ({st})")

        # Reset detaches
        request(qt, ATTACH, edu)
        qt.qmp("system_reset")
        setup(qt)                           # reset cleared the BARs
        qt.cfg_write(rp, 0x18, 0x050500)    # and the bus numbers
        st, _, _, res = request(qt, QUERY, edu)
        check(st == 0 and res == 4, f"system_reset detached edu ({st}, {res})")

        # Migration: attach with a mapping, save, load into a new QEMU
        request(qt, ATTACH, edu)
        request(qt, ATTACH, 0x0500)
        st, *_ = request(qt, MAP, edu, READ | WRITE | FIXED, IOVA_SRC,
                         segs=[(SRC_GPA, 8192)])
        check(st == 0, "MAP before migration")
        qt.qmp("stop")
        mig = os.path.join(qt.tmp, "mig")
        qt.qmp("migrate", uri=f"file:{mig}")
        check(wait_migration(qt) == "completed", "migration saved")
    finally:
        out = qt.close()
    if out.strip():
        print(out, file=sys.stderr)

    qt = QTest(qemu, devices + ["-incoming", "defer"])
    try:
        qt.qmp("migrate-incoming", uri=f"file:{mig}")
        check(wait_migration(qt) == "completed", "migration loaded")
        info = qt.qmp("query-pvdma")[0]
        eps = {e["requester"]: e for e in info["endpoints"]}
        e = eps[f"00:{edu >> 3:02x}.{edu & 7}"]
        check(e["attached"] and e["mappings"] == 1 and
              e["mapped-bytes"] == 8192,
              f"destination has edu attached with its mapping ({e})")
        check(eps.get("05:00.0", {}).get("attached"),
              "destination has 05:00.0 (behind the root port) attached")
        qt.qmp("cont")                      # the source was stopped
        setup(qt)                           # edu has no migration state
        pattern = bytes(range(255, -1, -1)) * 4
        qt.mem_write(SRC_GPA + 4096, pattern)
        edu_dma(qt, IOVA_SRC + 4096, 0x40000, len(pattern), to_pci=False)
        edu_dma(qt, 0x40000, IOVA_SRC, len(pattern), to_pci=True)
        got = qt.mem_read(SRC_GPA, len(pattern))
        check(got == pattern, "destination translates as the source did "
              f"(faults {qt.qmp('query-pvdma')[0]['last-faults'][:2]}, "
              f"got {got[:8].hex()})")
    finally:
        out = qt.close()
    if out.strip():
        print(out, file=sys.stderr)
    print("PASS", file=sys.stderr)


if __name__ == "__main__":
    main()
