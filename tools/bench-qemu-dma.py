#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""QEMU per-DMA cost: pvdma beside no IOMMU and intel-iommu (issue 12).

Starts one QEMU binary under `-accel qtest` (no guest code runs) once per
configuration per round, the configurations interleaved (round 1: each
once, round 2: again, ...), so that a change of load on the shared
machine hits every configuration alike:

  none    q35 + `edu` (the DMA initiator), no IOMMU: DMA addresses are
          guest-physical
  pvdma   q35 + `-device pvdma` + edu; the script plays the guest driver
          over qtest (request blocks in guest RAM, DOORBELL; the same
          helpers as tests/qemu/pvdma-doorbell-check.py): ATTACH edu, MAP
          each IOVA range onto its pages, read-write
  intel   q35 + `-device intel-iommu` + edu; the script writes a root
          table, a context entry and 4-level second-level page tables for
          edu into guest RAM over qtest, then sets the root table pointer
          and enables translation through GCMD (legacy mode, as a Linux
          guest with intel_iommu=on programs it)

In each QEMU it runs every workload with the QMP command
x-pvdma-dma-bench (the pvdma series' patch "add x-pvdma-dma-bench"),
which makes edu read the segments with pci_dma_read() in a loop inside
QEMU, so what is timed is QEMU's DMA path and the IOMMU's translate, not
a qtest round trip. Workloads (IOVAs with an IOMMU, the same guest pages
without):

  4k       one 4 KiB read
  sg16     64 KiB scattered: 16 reads of 4 KiB at 16 scattered IOVAs,
           each its own mapping, onto 16 scattered guest pages
  64k      one 64 KiB read of an IOVA range mapped onto 64 KiB of
           contiguous, 64 KiB-aligned guest RAM (one 64 KiB mapping)
  64k-in-2m  one 64 KiB read at the start of a 2 MiB mapping, 2 MiB-
           aligned in IOVA and guest-physical space (pvdma's table holds
           it as one 2 MiB leaf; intel-iommu gets a 2 MiB superpage)

It prints per configuration and workload the median over rounds of the
thread CPU time per transfer (ns; min-max beside it; wall time in the
JSON), and the ratios pvdma/none and pvdma/intel. The targets (pvdma <=
1.1 x none, pvdma < intel) are recorded, never asserted: the exit status
is 0 whatever they show.

--baseline-qemu BIN adds "pvdma@base" (and "none@base"): the same pvdma
runs with another binary, e.g. the series before a change to the glue,
interleaved in the same rounds, for before/after numbers.

--perf PREFIX records `perf record` of the QEMU process during a 5 s
run of --perf-workload in each configuration, and writes `perf report`'s
top symbols to PREFIX.CONFIG.txt.
"""

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "framework"))
from pvdma_qemu import (FLAG_FIXED, FLAG_READ, FLAG_WRITE,  # noqa: E402
                        OP_ATTACH, OP_MAP, PVDMA_DEVICE, PVDMA_VENDOR,
                        STATUS, QemuError, QTestMachine, exit_on_error)
from pvdma_qemu import request as pvdma_request  # noqa: E402

PAGE = 4096
MACHINE = ["-M", "q35", "-m", "256M", "-accel", "qtest", "-nographic",
           "-display", "none", "-serial", "none", "-monitor", "none"]
EDU = ["-device", "edu,id=dma0"]
EDU_ID = (0x1234, 0x11e8)

# Guest-physical layout (256 MiB of RAM)
PVDMA_BAR = 0xC0000000
BLOCK = 0x00100000          # pvdma request block
PT_BASE = 0x00400000        # intel-iommu root/context/page tables
GPA_4K = 0x01000000
GPA_SG = [0x02000000 + 0x5000 * i for i in
          (11, 3, 14, 0, 7, 9, 1, 15, 5, 12, 2, 8, 13, 4, 10, 6)]
GPA_64K = 0x03000000
GPA_2M = 0x04000000         # 2 MiB aligned
# IOVAs (with an IOMMU), below edu's 28-bit DMA mask
IOVA_4K = 0x0A000000
IOVA_SG = [0x0A400000 + 0x7000 * i for i in range(16)]
IOVA_64K = 0x0A800000
IOVA_2M = 0x0AC00000        # 2 MiB aligned
HUGE = 0x200000
IOVA_UNMAPPED = 0x0E000000

# workload -> [(iova, gpa, len)]: one transfer reads each segment in turn;
# each segment is mapped on its own, with its length or MAP_LEN's
WORKLOADS = {
    "4k": [(IOVA_4K, GPA_4K, PAGE)],
    "sg16": [(iova, gpa, PAGE) for iova, gpa in zip(IOVA_SG, GPA_SG)],
    "64k": [(IOVA_64K, GPA_64K, 0x10000)],
    "64k-in-2m": [(IOVA_2M, GPA_2M, 0x10000)],
}
MAP_LEN = {IOVA_2M: HUGE}
CONFIGS = ("none", "pvdma", "intel")

# intel-iommu (hw/i386/intel_iommu_internal.h, VT-d spec 10.4, 9.1-9.3)
VTD_BASE = 0xFED90000       # Q35_HOST_BRIDGE_IOMMU_ADDR
DMAR_GCMD, DMAR_GSTS, DMAR_RTADDR = 0x18, 0x1C, 0x20
GCMD_TE, GCMD_SRTP = 1 << 31, 1 << 30
VTD_SL_R, VTD_SL_W = 1, 2
CTX_AW_48 = 2               # 4-level tables, 48-bit IOVAs
DOMAIN_ID = 1


class Machine:
    """One QEMU of one configuration, set up and ready to time DMA."""

    def __init__(self, qemu, config, timeout):
        args = list(MACHINE)
        if config.startswith("pvdma"):
            args += ["-device", "pvdma"]
        elif config == "intel":
            args += ["-device", "intel-iommu"]
        self.config = config
        self.qt = QTestMachine(qemu, args + EDU, timeout=timeout,
                               connect_timeout=30)
        try:
            self.qt.connect()
            self.edu = self.qt.find(*EDU_ID)
            # memory + bus master: DMA goes nowhere without it
            self.qt.cfg_write(self.edu, 0x04, 0x6)
            self.fill_data()
            if config.startswith("pvdma"):
                self.setup_pvdma()
            elif config == "intel":
                self.setup_intel()
        except BaseException:
            self.close(show=True)
            raise

    def close(self, show=False):
        out = self.qt.close()
        if show and out.strip():
            print(out, file=sys.stderr)

    def fill_data(self):
        """Something other than zeroes in the pages DMA reads."""
        for segs in WORKLOADS.values():
            for _, gpa, n in segs:
                self.qt.mem_write(gpa, bytes([gpa >> 12 & 0xFF]) * n)

    def setup_pvdma(self):
        qt = self.qt
        pv = qt.find(PVDMA_VENDOR, PVDMA_DEVICE)
        qt.cfg_write(pv, 0x10, PVDMA_BAR)
        qt.cfg_write(pv, 0x04, 0x2)

        def req(op, **kw):
            st, *_ = pvdma_request(qt, PVDMA_BAR, BLOCK, op, self.edu, **kw)
            if st != 0:
                raise QemuError(f"pvdma op {op} {kw}: {STATUS.get(st, st)}")

        req(OP_ATTACH)
        for segs in WORKLOADS.values():
            for iova, gpa, n in segs:
                req(OP_MAP, flags=FLAG_READ | FLAG_WRITE | FLAG_FIXED,
                    iova=iova, segs=[(gpa, MAP_LEN.get(iova, n))])

    def setup_intel(self):
        """Legacy-mode VT-d tables mapping every workload's IOVAs for edu
        (bus 0), then SRTP and TE through GCMD."""
        qt = self.qt
        pages = {}                  # gpa of a table -> its 512 entries
        next_free = [PT_BASE]

        def alloc():
            gpa = next_free[0]
            next_free[0] += PAGE
            pages[gpa] = [0] * 512
            return gpa

        root, ctx, pml4 = alloc(), alloc(), alloc()
        pages[root][0] = ctx | 1                            # bus 0: P
        # context entry of devfn: lo = SLPTPTR | TT multi-level | P,
        # hi = AW | DID << 8
        pages[ctx][2 * self.edu] = pml4 | 1
        pages[ctx][2 * self.edu + 1] = CTX_AW_48 | DOMAIN_ID << 8

        def map_page(iova, gpa, leaf_shift=12):
            table = pml4
            for shift in (39, 30, 21, 12):
                i = iova >> shift & 511
                if shift == leaf_shift:
                    # a 2 MiB superpage (PS, bit 7) above the last level
                    ps = 1 << 7 if shift != 12 else 0
                    pages[table][i] = gpa | ps | VTD_SL_R | VTD_SL_W
                    return
                if not pages[table][i]:
                    pages[table][i] = alloc() | VTD_SL_R | VTD_SL_W
                table = pages[table][i] & ~0xFFF

        for segs in WORKLOADS.values():
            for iova, gpa, n in segs:
                n = MAP_LEN.get(iova, n)
                if n == HUGE and not (iova | gpa) & (HUGE - 1):
                    map_page(iova, gpa, 21)
                    continue
                for off in range(0, n, PAGE):
                    map_page(iova + off, gpa + off)
        for gpa, entries in pages.items():
            qt.mem_write(gpa, b"".join(e.to_bytes(8, "little")
                                       for e in entries))
        qt.writeq(VTD_BASE + DMAR_RTADDR, root)
        qt.writel(VTD_BASE + DMAR_GCMD, GCMD_SRTP)
        qt.writel(VTD_BASE + DMAR_GCMD, GCMD_TE)
        gsts = qt.readl(VTD_BASE + DMAR_GSTS)
        if gsts & (GCMD_TE | GCMD_SRTP) != GCMD_TE | GCMD_SRTP:
            raise QemuError(f"intel-iommu: GSTS 0x{gsts:x}, translation "
                            "not enabled")

    def segments(self, workload):
        iommu = self.config != "none" and not self.config.startswith("none")
        return [{"addr": iova if iommu else gpa, "len": n}
                for iova, gpa, n in WORKLOADS[workload]]

    def bench(self, workload, iterations):
        return self.qt.qmp.execute("x-pvdma-dma-bench", device="dma0",
                                   segments=self.segments(workload),
                                   iterations=iterations)

    def check_refused(self):
        """An unmapped IOVA must fail the command (nothing is timed)."""
        try:
            self.qt.qmp.execute("x-pvdma-dma-bench", device="dma0",
                                segments=[{"addr": IOVA_UNMAPPED, "len": PAGE}],
                                iterations=1)
        except QemuError:
            return True
        return False


def qemu_pid(qt):
    """QEMU's pid: the child of `timeout`."""
    tpid = qt.proc.pid
    with open(f"/proc/{tpid}/task/{tpid}/children") as f:
        return int(f.read().split()[0])


def calibrate(qemu, secs, timeout):
    """Iterations per workload for about `secs` of the slowest config."""
    iters = {}
    for config in CONFIGS:
        m = Machine(qemu, config, timeout)
        try:
            for w in WORKLOADS:
                m.bench(w, 2000)                    # warm-up
                r = m.bench(w, 2000)
                per = r["cpu-ns"] / r["iterations"]
                n = int(secs * 1e9 / max(per, 1))
                iters[w] = min(iters.get(w, n), n)
        finally:
            m.close()
    return {w: max(1000, min(n, 10**8)) for w, n in iters.items()}


def run_perf(qemu, config, workload, out, timeout):
    """perf record (flat, user and kernel) of one configuration's QEMU
    during a 5 s loop of `workload`; writes perf report's top symbols."""
    m = Machine(qemu, config, timeout)
    data = f"{out}.{config}.data"
    try:
        r = m.bench(workload, 2000)
        n = int(5e9 / (r["cpu-ns"] / r["iterations"]))
        perf = subprocess.Popen(
            ["timeout", "--kill-after=5", "30", "perf", "record", "-F",
             "4999", "-o", data, "-p", str(qemu_pid(m.qt)), "--", "sleep",
             "5.5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            m.bench(workload, n)
        finally:
            perf.wait()
    finally:
        m.close()
    rep = subprocess.run(
        ["perf", "report", "-i", data, "--stdio", "--percent-limit", "1",
         "--sort", "dso,symbol"],
        capture_output=True, text=True, check=True).stdout
    with open(f"{out}.{config}.txt", "w") as f:
        f.write(rep)
    print(f"perf {config} {workload}: {data}, {out}.{config}.txt")


def fmt_ratio(a, b):
    return f"{a / b:.2f}" if a and b else "n/a"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Example: tools/bench-qemu-dma.sh --rounds 7 --json r.json")
    ap.add_argument("--qemu", help="QEMU binary (default: qemu-build.sh's)")
    ap.add_argument("--baseline-qemu",
                    help="another binary whose pvdma and none runs go "
                    "beside (labels pvdma@base, none@base)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--secs", type=float, default=0.3,
                    help="CPU seconds per workload per run, roughly")
    ap.add_argument("--timeout", type=float, default=120,
                    help="hard limit per QEMU, seconds")
    ap.add_argument("--json", help="write the runs and medians here")
    ap.add_argument("--perf", metavar="PREFIX",
                    help="also profile each configuration's loop: "
                    "PREFIX.CONFIG.data and PREFIX.CONFIG.txt")
    ap.add_argument("--perf-workload", default="4k", choices=list(WORKLOADS))
    a = ap.parse_args()
    # SIGTERM and SIGHUP unwind through the finally blocks that end QEMU
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    if a.rounds < 0 or a.secs <= 0 or not (a.rounds or a.perf):
        ap.error("--rounds must be >= 1 (0 only with --perf) and --secs > 0")
    qemu = a.qemu or subprocess.run(
        [os.path.join(HERE, "qemu-build.sh")], check=True,
        stdout=subprocess.PIPE, text=True).stdout.split()[-1]

    # Correctness first: a refused DMA must fail, not be timed
    for config in ("pvdma", "intel"):
        m = Machine(qemu, config, a.timeout)
        try:
            if not m.check_refused():
                sys.exit(f"{config}: DMA to an unmapped IOVA was not refused")
        finally:
            m.close()

    if not a.rounds:
        for config in CONFIGS:
            run_perf(qemu, config, a.perf_workload, a.perf, a.timeout)
        return
    iters = calibrate(qemu, a.secs, a.timeout)
    plan = [(c, qemu) for c in CONFIGS]
    if a.baseline_qemu:
        plan += [("none@base", a.baseline_qemu),
                 ("pvdma@base", a.baseline_qemu)]
    labels = [c for c, _ in plan]
    runs = []                           # one dict per (round, config, wl)
    print(f"qemu {qemu}" + (f", baseline {a.baseline_qemu}"
                            if a.baseline_qemu else ""))
    print("iterations: " + ", ".join(f"{w} {n}" for w, n in iters.items()))
    for rnd in range(a.rounds):
        for config, binary in plan:
            m = Machine(binary, config.split("@")[0], a.timeout)
            try:
                for w in WORKLOADS:
                    r = m.bench(w, iters[w])
                    runs.append({"round": rnd, "config": config,
                                 "workload": w, **r})
            finally:
                m.close()
        print(f"round {rnd + 1}/{a.rounds} done", flush=True)

    med = {}
    for config in labels:
        for w in WORKLOADS:
            cpu = [r["cpu-ns"] / r["iterations"] for r in runs
                   if r["config"] == config and r["workload"] == w]
            wall = [r["wall-ns"] / r["iterations"] for r in runs
                    if r["config"] == config and r["workload"] == w]
            med[config, w] = {"cpu": statistics.median(cpu),
                              "cpu_min": min(cpu), "cpu_max": max(cpu),
                              "wall": statistics.median(wall)}

    print()
    print("ns per transfer, thread CPU time, median over "
          f"{a.rounds} rounds (min-max)")
    print()
    print("| workload | " + " | ".join(labels) +
          " | pvdma/none | pvdma/intel |" +
          (" pvdma/pvdma@base |" if a.baseline_qemu else ""))
    print("|---" * (len(labels) + 3 + bool(a.baseline_qemu)) + "|")
    for w in WORKLOADS:
        cells = [f"{med[c, w]['cpu']:.0f} ({med[c, w]['cpu_min']:.0f}-"
                 f"{med[c, w]['cpu_max']:.0f})" for c in labels]
        p = med["pvdma", w]["cpu"]
        line = (f"| {w} | " + " | ".join(cells) +
                f" | {fmt_ratio(p, med['none', w]['cpu'])}"
                f" | {fmt_ratio(p, med['intel', w]['cpu'])} |")
        if a.baseline_qemu:
            line += f" {fmt_ratio(p, med['pvdma@base', w]['cpu'])} |"
        print(line)
    print()
    for w in WORKLOADS:
        p, n, i = (med[c, w]["cpu"] for c in ("pvdma", "none", "intel"))
        print(f"target {w}: pvdma/none {p / n:.2f} "
              f"({'met' if p <= 1.1 * n else 'NOT met'}: <= 1.10), "
              f"pvdma/intel {p / i:.2f} "
              f"({'met' if p < i else 'NOT met'}: < 1)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": os.environ.get("PVDMA_BENCH_CMD") or
                       " ".join(shlex.quote(x) for x in sys.argv),
                       "qemu": qemu, "baseline_qemu": a.baseline_qemu,
                       "iterations": iters, "rounds": a.rounds, "runs": runs,
                       "medians": {f"{c}/{w}": v
                                   for (c, w), v in med.items()}},
                      f, indent=1)
    if a.perf:
        for config in CONFIGS:
            run_perf(qemu, config, a.perf_workload, a.perf, a.timeout)


if __name__ == "__main__":
    exit_on_error(main)
