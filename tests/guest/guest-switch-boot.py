#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""One boot of the I/O guest with pvdma_iommu.ko that moves a function
between IOMMU domains while the host makes it DMA, then powers off.

The machine is the I/O guest's (tests/framework/pvdma_guest.py) plus an
`edu` function without a driver at 00:10.0. After the usual disk and
network checks the guest (guest/io/init, pvdmaio.switch) turns on edu's bus
mastering and writes DMA and DMA-FQ to its iommu_group/type ROUNDS times;
each DMA-FQ -> DMA makes the IOMMU core attach a new paging domain (an
empty one: edu has no driver, so nothing is mapped in either domain).
Meanwhile a thread on a second QMP monitor keeps making edu read guest
RAM at a guest-physical address with x-pvdma-dma-bench, one page at a
time. Checks:

  * no probe read succeeds: a read can only complete if edu bypassed
    translation, i.e. reached memory outside both domains;
  * the reads were refused: FAULTS rose by at least their number, all
    faults edu's;
  * the switches sent no DETACH and no ATTACH (query-pvdma's request
    counts): the endpoint stayed attached throughout;
  * failed replay: with QEMU's pin-limit at 256 MiB, the driver's test
    hook (test_failed_replay) attaches edu to a domain that maps 512 MiB
    while no device uses it; the replay gets QUOTA and the attach must
    fail without a DETACH. Then edu must be attached (blocked or back in
    its default domain: never bypassing), its reads of guest RAM and of
    the domain's IOVAs refused and counted in FAULTS;
  * queues (when the host offers FEATURES.QUEUE): test_cross_queue maps a
    page for edu on CPU 1 and unmaps it on CPU 0 (different queues); the
    SYNC after it must report no failed entry. test_ring_full maps a
    page at 4096 IOVAs and unmaps them: a full ring must have been synced
    and no entry failed. At the end (after the partial unmap)
    test_break_queue overruns a queue: the host must stop it, the driver
    tear every queue down (none set up at the queue-broken pause) and
    disk I/O go on with synchronous MAPs. Before that the driver's
    test hook test_queued_fail puts edu in a new domain that maps 512
    MiB with one queued MAP, which the pin-limit refuses; the guest
    checks that the SYNC after it logged the failure with status QUOTA
    and the rebuild logged the refused MAP with edu's name and the IOVA,
    the host that the queues counted exactly that one failed entry;
    without QUEUE the guest must have skipped both;
  * partial unmap: the driver's test hook (test_partial_unmap) puts edu
    in a new paging domain that maps 16 KiB at TEST_IOVA with one
    iommu_map() and unmaps its second page; the hook checks the size the
    IOMMU core got back and iova_to_phys, the host that edu's endpoint
    holds the other three pages (12 KiB in 2 mappings) and that edu's
    reads there complete, and not in the unmapped page;
  * after the guest's power-off (QEMU pauses, -action shutdown=pause, so
    nothing is reset) every endpoint is detached: the driver's shutdown
    hook, which a kexec runs too, DETACHed them.

Usage: guest-switch-boot.py --qemu BIN --kernel 6.1|6.12 [--rounds N]
       [--timeout S] [--strict]
"""

import argparse
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "framework"))
import pvdma_guest as pg  # noqa: E402
from pvdma_qemu import QMP, QemuError, interrupt_on_signals  # noqa: E402

EDU_ADDR = "10.0"
EDU = "00:" + EDU_ADDR
# A guest-physical address in RAM (1 GiB guest) that no domain of edu maps.
PROBE_GPA = 0x1000000
# Where test_partial_unmap maps (PVDMA_TEST_IOVA in the driver).
TEST_IOVA = 0x10000000
# Where test_failed_replay maps (PVDMA_TEST_REPLAY_IOVA in the driver).
REPLAY_IOVA = 0x40000000


class Prober:
    """Makes edu read PROBE_GPA over its own QMP connection until stopped;
    counts the reads that completed and those refused."""

    def __init__(self, path, deadline):
        self.path, self.deadline = path, deadline
        self.reached = self.refused = 0
        self.errors = []
        self.stop = threading.Event()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            qmp = QMP.connect(self.path, self.deadline)
        except QemuError as e:
            self.errors.append(str(e))
            return
        try:
            while not self.stop.is_set():
                try:
                    qmp.execute("x-pvdma-dma-bench", device="edu0",
                                segments=[{"addr": PROBE_GPA, "len": 4096}],
                                iterations=1)
                    self.reached += 1
                except QemuError as e:
                    if "failed" not in str(e):
                        self.errors.append(str(e))
                        return
                    self.refused += 1
        except (OSError, QemuError) as e:
            self.errors.append(str(e))
        finally:
            qmp.close()

    def finish(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)


def counts(snap):
    dev = snap[0]
    req = dev.get("requests", {})
    eps = {e["requester"]: e for e in dev.get("endpoints", [])}
    return dev.get("faults", 0), req.get("detach", 0), \
        req.get("attach", 0), eps, dev.get("last-faults", [])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", required=True)
    ap.add_argument("--kernel", default="6.12", choices=("6.1", "6.12", "7.2"))
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--summary-file",
                    help="append the one-line verdict to this file")
    a = ap.parse_args()
    interrupt_on_signals()
    image = pg.prepare(a.kernel)
    tmp = tempfile.TemporaryDirectory(prefix="pvdma-switch-")
    qmp2 = os.path.join(tmp.name, "qmp2")
    prober = Prober(qmp2, time.monotonic() + a.timeout)

    partial = {}
    replay = {}

    def edu_reads(vm, addr):
        """True when edu's one-page read at addr completes."""
        try:
            vm.qmp().execute("x-pvdma-dma-bench", device="edu0",
                             segments=[{"addr": addr, "len": 4096}],
                             iterations=1)
            return True
        except QemuError as e:
            if "failed" not in str(e):
                raise
            return False

    def on_pause(vm, tag, when):
        if tag == "switch-begin" and when == "after":
            prober.start()
        elif tag == "switch-end" and when == "before":
            prober.finish()
        elif tag == "partial-unmap" and when == "before":
            for page in range(4):
                partial[page] = edu_reads(vm, TEST_IOVA + page * 4096)
        elif tag == "failed-replay":
            # Before and after the reads: FAULTS must count them.
            replay[when] = counts(vm.qmp().execute("query-pvdma"))
            if when == "before":
                replay["ram"] = edu_reads(vm, PROBE_GPA)
                replay["iova"] = edu_reads(vm, REPLAY_IOVA)

    try:
        r = pg.run_variant(
            a.qemu, image, "pvdma", strict=a.strict, timeout=a.timeout,
            modparams="exclude=00:01.0",
            extra_append=[f"pvdmaio.switch={EDU}:{a.rounds}",
                          f"pvdmaio.failed_replay={EDU}",
                          f"pvdmaio.queued_fail={EDU}",
                          "pvdmaio.break_queue=1",
                          f"pvdmaio.partial_unmap={EDU}"],
            extra_args=["-device", f"edu,id=edu0,addr=0x{EDU_ADDR[:2]}",
                        "-global", "pvdma.pin-limit=256M",
                        "-qmp", f"unix:{qmp2},server=on,wait=off"],
            on_pause=on_pause, clean_tag="switch-begin",
            after_poweroff=True)
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted ({e or 'SIGINT'})")
    finally:
        prober.finish()
        tmp.cleanup()

    problems = [] if r.passed else [r.failure]
    begin, end = r.snapshots.get("switch-begin"), r.snapshots.get("switch-end")
    # Judged whenever both were taken, also when the boot failed later.
    if not (begin and end):
        problems.append("no query-pvdma at switch-begin/switch-end")
    else:
        f0, d0, a0, eps0, _ = counts(begin)
        f1, d1, a1, eps1, last = counts(end)
        print(f"== probes: {prober.refused} refused, {prober.reached} "
              f"reached guest RAM; FAULTS +{f1 - f0}, DETACH +{d1 - d0}, "
              f"ATTACH +{a1 - a0}")
        if prober.errors:
            problems.append(f"probe: {prober.errors[0]}")
        if prober.reached:
            problems.append(f"{prober.reached} DMA reads by edu reached "
                            f"guest RAM at 0x{PROBE_GPA:x} during the "
                            "switches: it bypassed translation")
        if not prober.refused:
            problems.append("no probe read was made during the switches")
        if f1 - f0 < prober.refused:
            problems.append(f"FAULTS rose by {f1 - f0}, fewer than the "
                            f"{prober.refused} refused reads")
        others = {f["requester"] for f in last} - {EDU}
        if others:
            problems.append(f"faults from {sorted(others)}, not only {EDU}")
        if d1 != d0 or a1 != a0:
            problems.append(f"the switches sent {d1 - d0} DETACH and "
                            f"{a1 - a0} ATTACH: the endpoint left "
                            "translation")
        for eps, tag in ((eps0, "switch-begin"), (eps1, "switch-end")):
            if not eps.get(EDU, {}).get("attached"):
                problems.append(f"{EDU} not attached at {tag}")
    if "after" not in replay:
        problems.append("no failed-replay pause")
    else:
        f0, f1 = replay["before"][0], replay["after"][0]
        ep = replay["before"][3].get(EDU, {})
        print(f"== failed replay: edu attached={ep.get('attached')} "
              f"mappings={ep.get('mappings')}; its reads of guest RAM "
              f"completed={replay['ram']}, of the domain's IOVA "
              f"completed={replay['iova']}; FAULTS +{f1 - f0}")
        if not ep.get("attached"):
            problems.append("after the failed replay edu is not attached: "
                            "its DMA bypasses translation")
        if replay["ram"] or replay["iova"]:
            problems.append("after the failed replay edu's reads completed "
                            f"(guest RAM: {replay['ram']}, the domain's "
                            f"IOVA: {replay['iova']})")
        if f1 - f0 < 2:
            problems.append(f"FAULTS rose by {f1 - f0} for 2 refused reads")
        # The failed switch itself must not have left translation either
        # (the IOMMU core re-attaches the old domain at once, so only the
        # requests show a detour through DETACH).
        if end:
            d_end, d_fr = counts(end)[1], replay["before"][1]
            print(f"== failed replay: DETACH +{d_fr - d_end}")
            if d_fr != d_end:
                problems.append(f"the failed switch sent {d_fr - d_end} "
                                "DETACH: the endpoint left translation")
    qf = r.snapshots.get("queued-fail")
    if not qf:
        problems.append("no query-pvdma at queued-fail")
    elif qf[0].get("features", 0) & 16:
        nq, _, applied, failed = pg.queue_summary(qf)[0][:4]
        print(f"== queued fail: {nq} queues, {applied} entries applied, "
              f"{failed} failed")
        if not any(f"QUEUED-FAIL {EDU}" in line for line in r.console):
            problems.append("the host offers QUEUE, but the guest did not "
                            "run test_queued_fail")
        # Exactly the refused MAP: an UNMAP applied before its MAP (a
        # cross-queue order bug) would fail too, with NOENT.
        if failed != 1:
            problems.append(f"{failed} queued entries failed, not the one "
                            "MAP test_queued_fail made")
    elif not any("QUEUED-FAIL skipped" in line for line in r.console):
        problems.append("no QUEUE offered, but test_queued_fail was not "
                        "skipped")
    qb = r.snapshots.get("queue-broken")
    pu = r.snapshots.get("partial-unmap")
    if not qb or not pu:
        problems.append("no query-pvdma at queue-broken")
    elif qb[0].get("features", 0) & 16:
        left = [q["index"] for q in qb[0].get("queues", []) if q["set-up"]]
        maps = qb[0]["requests"]["map"] - pu[0]["requests"]["map"]
        print(f"== broken queue: queues still set up {left}; {maps} "
              "synchronous MAPs since")
        if not any("PVDMA-IO: BREAK-QUEUE" in line and "skipped" not in line
                   for line in r.console):
            problems.append("the host offers QUEUE, but the guest did not "
                            "run test_break_queue")
        if left:
            problems.append(f"after the broken queue, queues {left} are "
                            "still set up")
        if maps <= 0:
            problems.append("no synchronous MAP after the queues were "
                            "given up")
    elif not any("BREAK-QUEUE skipped" in line for line in r.console):
        problems.append("no QUEUE offered, but test_break_queue was not "
                        "skipped")
    if not pu:
        problems.append("no query-pvdma at partial-unmap")
    else:
        ep = counts(pu)[3].get(EDU, {})
        print(f"== partial unmap: edu holds {ep.get('mappings')} mappings, "
              f"{ep.get('mapped-bytes')} bytes; reads of its 4 pages: "
              f"{[partial.get(i) for i in range(4)]}")
        if (ep.get("mappings"), ep.get("mapped-bytes")) != (2, 12288):
            problems.append(f"after unmapping 1 page of 4 edu holds "
                            f"{ep.get('mappings')} mappings of "
                            f"{ep.get('mapped-bytes')} bytes, not 2 of "
                            "12288")
        if [partial.get(i) for i in range(4)] != [True, False, True, True]:
            problems.append("edu's reads of the 4 pages completed: "
                            f"{[partial.get(i) for i in range(4)]}, not "
                            "[True, False, True, True]")
    verdict = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    line = (f"guest-switch kernel {a.kernel}"
            f"{' strict' if a.strict else ''}: {verdict}")
    print("== " + line)
    if a.summary_file:
        with open(a.summary_file, "a") as f:
            f.write(line + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
