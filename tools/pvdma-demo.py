#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Real DMA through pvdma, end to end, with no guest kernel.

Starts the patched QEMU (q35, TCG, -nographic) with `-device pvdma` and
`-device edu` behind it. The firmware is a 64 KiB image whose reset vector
halts the CPU, so the machine runs (its virtual clock, which paces edu's DMA
engine, moves) but nothing in the guest touches memory. This script then
plays the guest driver over QEMU's qtest protocol (guest-physical memory,
port and MMIO accesses) and talks QMP:

  * programs the PCI BARs and bus mastering of pvdma and edu,
  * writes pvdma request blocks into guest RAM and rings the doorbell:
    QUERY, ATTACH edu, MAP one page READ and one page WRITE at IOVAs that
    differ from their guest-physical addresses,
  * makes edu DMA RAM -> edu -> RAM through those IOVAs and checks that the
    bytes landed in the mapped guest page,
  * makes edu DMA to an IOVA with no mapping and checks that it is refused
    (FAULTS grows, memory untouched),
  * prints `query-pvdma` (QMP) and `info pvdma` (HMP).

Usage: pvdma-demo.py QEMU_BINARY [TIMEOUT_SECONDS]
Exit status 0 when every check passed. QEMU is always killed on exit.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "tests", "framework"))
from pvdma_qemu import (FLAG_FIXED, FLAG_READ, FLAG_WRITE, OP_ATTACH,
                        OP_DETACH, OP_MAP, OP_QUERY, REG_FAULTS,
                        REG_FEATURES, REG_IOVA_BITS, REG_MAGIC, REG_MAX_SEGS,
                        REG_PAGE_SIZES, REG_VERSION, STATUS, QemuError,
                        QTestMachine, request)

PAGE = 4096

# edu (hw/misc/edu.c)
EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_CNT, EDU_DMA_CMD = 0x80, 0x88, 0x90, 0x98
EDU_BUF = 0x40000

PVDMA_SLOT, EDU_SLOT = 4, 5
PVDMA_BAR, EDU_BAR = 0xC0000000, 0xC0100000   # in q35's PCI hole
REQ_GPA = 0x100000
SRC_GPA, DST_GPA = 0x800000, 0x810000          # the guest's buffers
SRC_IOVA, DST_IOVA = 0x1000000, 0x1100000      # where edu sees them
UNMAPPED_IOVA = 0x1200000


def log(msg=""):
    print(msg, flush=True)


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)
    log(f"  ok: {what}")


class Guest:
    """The guest driver's view: pvdma's BAR0, request blocks, edu."""

    def __init__(self, qt):
        self.qt = qt

    def reg32(self, off):
        return self.qt.readl(PVDMA_BAR + off)

    def reg64(self, off):
        return self.qt.readq(PVDMA_BAR + off)

    def request(self, *args, **kw):
        return request(self.qt, PVDMA_BAR, REQ_GPA, *args, **kw)

    def edu_dma(self, to_ram, addr, count):
        qt, bar = self.qt, EDU_BAR
        qt.writeq(bar + EDU_DMA_SRC, EDU_BUF if to_ram else addr)
        qt.writeq(bar + EDU_DMA_DST, addr if to_ram else EDU_BUF)
        qt.writeq(bar + EDU_DMA_CNT, count)
        qt.writeq(bar + EDU_DMA_CMD, 0x1 | (0x2 if to_ram else 0))
        # edu starts the copy 100 ms (virtual clock) after the command.
        limit = time.monotonic() + 10
        while qt.readq(bar + EDU_DMA_CMD) & 1:
            if time.monotonic() > limit:
                raise Fail("edu DMA never finished")
            time.sleep(0.02)


def halting_firmware(path):
    """64 KiB BIOS image: the reset vector (0xffff0) is `cli; hlt; jmp .-1`."""
    image = bytearray(64 * 1024)
    image[0xFFF0:0xFFF4] = b"\xfa\xf4\xeb\xfd"
    with open(path, "wb") as f:
        f.write(image)


def demo(qt):
    g, qmp = Guest(qt), qt.qmp
    edu_rid = EDU_SLOT << 3
    v = qmp.greeting["QMP"]["version"]["qemu"]
    log(f"QEMU {v['major']}.{v['minor']}.{v['micro']}, "
        f"status {qmp.execute('query-status')['status']}")

    log("\n== PCI functions (query-pci)")
    for bus in qmp.execute("query-pci"):
        for d in bus["devices"]:
            log(f"  {d['bus']:02x}:{d['slot']:02x}.{d['function']} "
                f"{d['id']['vendor']:04x}:{d['id']['device']:04x} "
                f"{d.get('qdev_id') or ''} {d['class_info'].get('desc', '')}")
    check(qt.cfg_read(PVDMA_SLOT << 3, 0) == 0x00151B36, "pvdma 1b36:0015 at 00:04.0")
    check(qt.cfg_read(EDU_SLOT << 3, 0) == 0x11E81234, "edu 1234:11e8 at 00:05.0")

    # What firmware would do: place BAR0s, enable memory decoding and DMA.
    for slot, bar in ((PVDMA_SLOT, PVDMA_BAR), (EDU_SLOT, EDU_BAR)):
        qt.cfg_write(slot << 3, 0x10, bar)
        qt.cfg_write(slot << 3, 0x04, 0x6)   # MEMORY | BUS MASTER

    log("\n== pvdma registers")
    check(g.reg32(REG_MAGIC) == 0x414D4450, "MAGIC reads 'PDMA'")
    log(f"  VERSION {g.reg32(REG_VERSION)}  FEATURES 0x{g.reg64(REG_FEATURES):x}"
        f"  IOVA_BITS {g.reg32(REG_IOVA_BITS)}  MAX_SEGS {g.reg32(REG_MAX_SEGS)}"
        f"  PAGE_SIZES 0x{g.reg64(REG_PAGE_SIZES):x}")

    log("\n== requests through the doorbell")
    st, _, _, res = g.request(OP_QUERY, edu_rid)
    log(f"  QUERY edu -> {STATUS[st]}, result 0x{res:x} (bit 2: bypass)")
    check(st == 0 and res == 0x4, "edu starts detached, bypassing")
    st, *_ = g.request(OP_ATTACH, edu_rid)
    log(f"  ATTACH edu -> {STATUS[st]}")
    check(st == 0, "edu attached")
    for name, gpa, iova, flags in (("READ", SRC_GPA, SRC_IOVA, FLAG_READ),
                                   ("WRITE", DST_GPA, DST_IOVA, FLAG_WRITE)):
        st, out_iova, length, _ = g.request(
            OP_MAP, edu_rid, flags | FLAG_FIXED, iova, segs=[(gpa, PAGE)])
        log(f"  MAP {name} gpa 0x{gpa:x} at IOVA 0x{iova:x} -> {STATUS[st]}, "
            f"iova 0x{out_iova:x} length 0x{length:x}")
        check(st == 0 and out_iova == iova, f"{name} mapping in place")

    log("\n== edu DMA through pvdma")
    message = b"pvdma: this page travelled RAM -> edu -> RAM through IOVAs. "
    payload = (message * (PAGE // len(message) + 1))[:PAGE]
    qt.mem_write(SRC_GPA, payload)
    qt.mem_write(DST_GPA, b"\0" * PAGE)
    qt.mem_write(DST_IOVA, b"\xbb" * PAGE)   # the gpa that equals the IOVA
    g.edu_dma(False, SRC_IOVA, PAGE)
    log(f"  edu read 4 KiB from IOVA 0x{SRC_IOVA:x}")
    g.edu_dma(True, DST_IOVA, PAGE)
    log(f"  edu wrote 4 KiB to IOVA 0x{DST_IOVA:x}")
    got = qt.mem_read(DST_GPA, PAGE)
    log(f"  guest page 0x{DST_GPA:x} now holds: {got[:len(message)].decode()!r}")
    check(got == payload, "the data landed in the mapped guest page")
    check(qt.mem_read(DST_IOVA, PAGE) == b"\xbb" * PAGE,
          "guest-physical 0x%x (= the IOVA) untouched" % DST_IOVA)
    check(g.reg64(REG_FAULTS) == 0, "FAULTS still 0")

    log("\n== edu DMA to an unmapped IOVA")
    qt.mem_write(UNMAPPED_IOVA, b"\xcc" * PAGE)
    g.edu_dma(True, UNMAPPED_IOVA, 16)
    faults = g.reg64(REG_FAULTS)
    log(f"  edu wrote 16 bytes to IOVA 0x{UNMAPPED_IOVA:x}; FAULTS = {faults}")
    log("  (QEMU retries a refused DMA in 4-byte pieces: each one is refused)")
    check(faults > 0, "the access was refused (FAULTS grew)")
    check(qt.mem_read(UNMAPPED_IOVA, PAGE) == b"\xcc" * PAGE, "memory untouched")

    log("\n== QMP query-pvdma")
    log(json.dumps(qmp.execute("query-pvdma"), indent=2))
    log("\n== HMP info pvdma")
    log(qmp.execute("human-monitor-command", **{"command-line": "info pvdma"})
        .rstrip())

    st, _, _, res = g.request(OP_DETACH, edu_rid)
    log(f"\n  DETACH edu -> {STATUS[st]}, {res} mapping(s) removed")
    check(st == 0 and res == 2, "both mappings removed")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    qemu = sys.argv[1]
    limit = float(sys.argv[2]) if len(sys.argv) > 2 else 60
    with tempfile.TemporaryDirectory(prefix="pvdma-demo-") as tmp:
        bios = os.path.join(tmp, "halt.bin")
        halting_firmware(bios)
        return run(qemu, limit, bios)


def run(qemu, limit, bios):
    args = ["-M", "q35", "-accel", "tcg", "-m", "128M", "-nographic",
            "-bios", bios,
            "-device", "pvdma,id=pvdma0,addr=04.0",
            "-device", "edu,id=edu0,addr=05.0"]
    qt = None
    rc = 1
    try:
        qt = QTestMachine(qemu, args, timeout=limit)
        log("$ " + " ".join(qt.argv[4:]))
        demo(qt.connect())
        qt.qmp.execute("quit")
        qt.proc.wait(timeout=max(1, qt.deadline - time.monotonic()))
        log("\nPASS: real DMA went through pvdma's translations")
        rc = 0
    except (Fail, QemuError, OSError, subprocess.TimeoutExpired,
            ValueError) as e:
        log(f"\nFAIL: {e}")
        if qt is not None:
            log("QEMU output:\n" + qt.close())
            qt = None
    finally:
        if qt is not None:
            qt.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
