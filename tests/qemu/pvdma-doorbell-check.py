#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""End-to-end check of -device pvdma through QEMU's qtest protocol.

Plays a guest driver with no guest: programs the BARs of pvdma and edu
through PCI config space, submits QUERY/ATTACH/MAP/UNMAP request blocks
through the DOORBELL and lets edu DMA through the translation, checking
that unmapped DMA is refused (FAULTS) and mapped DMA lands where the
mapping says. The QEMU tests proper are tests/qtest/pvdma-test.c; this is
the quick check tests/qemu/qemu-pvdma-smoke.sh runs on the built binary.

usage: pvdma-doorbell-check.py QEMU_BINARY
"""

import os
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "framework"))
from pvdma_qemu import (FLAG_FIXED as FIXED, FLAG_READ as READ,
                        FLAG_WRITE as WRITE, OP_ATTACH as ATTACH,
                        OP_DETACH as DETACH, OP_MAP as MAP,
                        OP_QUERY as QUERY, OP_UNMAP as UNMAP, PVDMA_DEVICE,
                        PVDMA_VENDOR, REG_DOORBELL, REG_DOORBELL_HI,
                        REG_FAULTS, REG_FEATURES, REG_IOVA_BITS, REG_MAGIC,
                        REG_MAX_SEGS, REG_PAGE_SIZES, REG_QUEUES,
                        REG_VERSION,
                        QTestMachine, encode_request, exit_on_error)
from pvdma_qemu import request as submit

PVDMA_BAR = 0xc0000000
EDU_BAR = 0xc0100000
BLOCK = 0x100000            # request block in guest RAM
SRC_GPA = 0x200000          # data edu reads
DST_GPA = 0x300000          # where edu writes back
IOVA_SRC = 0x10000
IOVA_DST = 0x20000
MACHINE = ["-M", "q35", "-m", "128M", "-nographic", "-accel", "qtest",
           "-display", "none", "-serial", "none", "-monitor", "none"]


def start(qemu, extra):
    """QEMU under `timeout` (60 s) with qtest and QMP, connected."""
    qt = QTestMachine(qemu, MACHINE + extra, timeout=60, connect_timeout=30)
    try:
        return qt.connect()
    except BaseException:
        out = qt.close()
        if out.strip():
            print(out, file=sys.stderr)
        raise


def request(qt, op, requester, flags=0, iova=0, length=0, segs=()):
    return submit(qt, PVDMA_BAR, BLOCK, op, requester, flags, iova, length,
                  segs)


def faults(qt):
    return qt.readq(PVDMA_BAR + REG_FAULTS)


def edu_dma(qt, src, dst, count, to_pci):
    qt.writeq(EDU_BAR + 0x80, src)
    qt.writeq(EDU_BAR + 0x88, dst)
    qt.writeq(EDU_BAR + 0x90, count)
    qt.writeq(EDU_BAR + 0x98, 1 | (2 if to_pci else 0))
    qt.clock_step(200000000)                # edu runs DMA from a 100 ms timer


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, file=sys.stderr)
    if not cond:
        sys.exit(1)


def setup(qt):
    pv = qt.find(PVDMA_VENDOR, PVDMA_DEVICE)
    edu = qt.find(0x1234, 0x11e8)
    qt.cfg_write(pv, 0x10, PVDMA_BAR)
    qt.cfg_write(pv, 0x04, 0x2)
    qt.cfg_write(edu, 0x10, EDU_BAR)
    qt.cfg_write(edu, 0x04, 0x6)          # memory + bus master
    return pv, edu


def wait_migration(qt):
    for _ in range(300):
        status = qt.qmp.execute("query-migrate").get("status")
        if status in ("completed", "failed"):
            return status
        time.sleep(0.1)
    return "timeout"


def main():
    qemu = sys.argv[1]
    devices = ["-device", "pvdma", "-device", "edu",
               "-device", "pcie-root-port,id=rp1,chassis=1,addr=0x10",
               "-device", "edu,bus=rp1"]
    tmp = tempfile.TemporaryDirectory(prefix="pvdma-doorbell-")
    mig = os.path.join(tmp.name, "mig")
    qt = start(qemu, devices)
    try:
        pv, edu = setup(qt)
        check(qt.cfg_read(pv, 8) == 0x08060001, "class 0x080600 rev 1")

        check(qt.readl(PVDMA_BAR + REG_MAGIC) == 0x414d4450, "MAGIC")
        check(qt.readl(PVDMA_BAR + REG_VERSION) == 1, "VERSION")
        # HOST_IOVA | BYPASS | UNMAP_LIST | QUEUE, and 8 queues
        check(qt.readq(PVDMA_BAR + REG_FEATURES) == 30, "FEATURES")
        check(qt.readl(PVDMA_BAR + REG_QUEUES) == 8, "QUEUES")
        check(qt.readl(PVDMA_BAR + REG_IOVA_BITS) == 48, "IOVA_BITS")
        check(qt.readl(PVDMA_BAR + REG_MAX_SEGS) >= 252, "MAX_SEGS")
        check(qt.readq(PVDMA_BAR + REG_PAGE_SIZES) & 0x1000, "PAGE_SIZES")
        check(qt.readl(PVDMA_BAR + 0x800) == 0, "undefined reads 0")

        st, _, _, res = request(qt, QUERY, edu)
        check(st == 0 and res == 4, f"QUERY edu: OK, bypass (status {st}, result {res})")
        st, *_ = request(qt, QUERY, pv)
        check(st == 2, f"QUERY pvdma itself: NODEV ({st})")

        pattern = bytes(range(256)) * 4
        qt.mem_write(SRC_GPA, pattern)
        st, *_ = request(qt, ATTACH, edu)
        check(st == 0, f"ATTACH edu ({st})")
        faults0 = faults(qt)
        edu_dma(qt, IOVA_SRC, 0x40000, len(pattern), to_pci=False)
        faults1 = faults(qt)
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
        faults2 = faults(qt)
        edu_dma(qt, 0x40000, IOVA_SRC, 16, to_pci=True)
        check(faults(qt) > faults2,
              "write to a read-only mapping refused")

        st, _, _, res = request(qt, UNMAP, edu, iova=IOVA_SRC)
        check(st == 0 and res == 4096, f"UNMAP ({st}, {res})")
        st, _, _, res = request(qt, DETACH, edu)
        check(st == 0 and res == 1, f"DETACH removed 1 mapping ({st}, {res})")
        st, _, _, res = request(qt, QUERY, edu)
        check(st == 0 and res == 4, "QUERY after DETACH: bypass again")

        # 32-bit doorbell: low half latched, high half triggers
        qt.mem_write(BLOCK, encode_request(QUERY, edu))
        qt.writel(PVDMA_BAR + REG_DOORBELL, BLOCK)
        qt.writel(PVDMA_BAR + REG_DOORBELL_HI, 0x0)
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
        qt.qmp.execute("system_reset")
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
        qt.qmp.execute("stop")
        qt.qmp.execute("migrate", uri=f"file:{mig}")
        check(wait_migration(qt) == "completed", "migration saved")
    finally:
        out = qt.close()
    if out.strip():
        print(out, file=sys.stderr)

    qt = start(qemu, devices + ["-incoming", "defer"])
    try:
        qt.qmp.execute("migrate-incoming", uri=f"file:{mig}")
        check(wait_migration(qt) == "completed", "migration loaded")
        info = qt.qmp.execute("query-pvdma")[0]
        eps = {e["requester"]: e for e in info["endpoints"]}
        e = eps[f"00:{edu >> 3:02x}.{edu & 7}"]
        check(e["attached"] and e["mappings"] == 1 and
              e["mapped-bytes"] == 8192,
              f"destination has edu attached with its mapping ({e})")
        check(eps.get("05:00.0", {}).get("attached"),
              "destination has 05:00.0 (behind the root port) attached")
        qt.qmp.execute("cont")                      # the source was stopped
        setup(qt)                           # edu has no migration state
        pattern = bytes(range(255, -1, -1)) * 4
        qt.mem_write(SRC_GPA + 4096, pattern)
        edu_dma(qt, IOVA_SRC + 4096, 0x40000, len(pattern), to_pci=False)
        edu_dma(qt, 0x40000, IOVA_SRC, len(pattern), to_pci=True)
        got = qt.mem_read(SRC_GPA, len(pattern))
        check(got == pattern, "destination translates as the source did "
              f"(faults {qt.qmp.execute('query-pvdma')[0]['last-faults'][:2]}, "
              f"got {got[:8].hex()})")
    finally:
        out = qt.close()
    if out.strip():
        print(out, file=sys.stderr)
    tmp.cleanup()
    print("PASS", file=sys.stderr)


if __name__ == "__main__":
    exit_on_error(main)
