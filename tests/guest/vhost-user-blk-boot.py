#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""One boot of the I/O guest with its virtio-blk disk served by
pvdma-vhost-user-blk (vhost-user-blk-pci,iommu_platform=on behind pvdma),
and the backend's verdict.

    vhost-user-blk-boot.py --backend BIN --mode sg|window [--qemu BIN]
        [--kernel 6.1] [--strict] [--refuse] [--kill] [--timeout S]
        [--summary-file F]

The guest (guest/io/init, tests/framework/pvdma_guest.py) loads
pvdma_iommu.ko and runs pvdma-io disk-verify (O_DIRECT, every byte
checked) on the vhost-user disk; query-pvdma at the end must show it
attached and FAULTS 0. Then the backend, which exits when QEMU closes the
socket, must have printed counters with IOTLB misses, updates and
invalidations, at most about one miss per request with more updates than
misses (QEMU's prefetch), and no refused access (no refused update
either: every translation QEMU sent was usable).

--refuse: the guest then makes one read whose MAP its driver skips
(pvdma-io disk-refused): the backend's miss is refused by QEMU (FAULTS
rises, for this function only), the read fails or leaves the buffer
untouched, the next read is correct; the backend must count the refused
access and an I/O error.

--kill: instead of a full run, SIGKILL the backend while the guest's
disk-verify runs. QEMU must stay up (QMP answers query-status) and the
test ends by closing QEMU; no process may be left behind. The guest's I/O
cannot complete (vhost-user-blk has no way to fail in-flight requests),
so the guest is not expected to PASS.
"""

import argparse
import os
import re
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "framework"))
import pvdma_guest as pg  # noqa: E402
from pvdma_vhost import Backend  # noqa: E402

def check_stats(st, refuse):
    """Problems in the backend's counters of a passing run."""
    if st is None:
        return ["the backend printed no counters"]
    problems = []
    for k in ("iotlb_misses", "iotlb_updates", "iotlb_invalidations",
              "iotlb_invalidated_entries", "read_bytes", "write_bytes"):
        if not st.get(k):
            problems.append(f"{k} is 0")
    if st.get("iotlb_refused"):
        problems.append(f"{st['iotlb_refused']} IOTLB messages refused")
    if st.get("bad_chains") or st.get("ring_errors"):
        problems.append("bad chains or ring errors")
    # QEMU's miss answer brings what the guest mapped since the last miss
    # (the iotlb_prefetch patches): about one miss per request, where a
    # miss per page (4 per 4 KiB read, 35 per 128 KiB) was the rule.
    misses, requests = st.get("iotlb_misses", 0), st.get("requests", 0)
    if misses > 1.25 * requests + 16:
        problems.append(f"{misses} IOTLB misses for {requests} requests: "
                        "more than one a request")
    if st.get("iotlb_updates", 0) <= misses:
        problems.append("no IOTLB update beyond the misses' own: "
                        "nothing was prefetched")
    if refuse:
        if not st.get("refused_accesses") or not st.get("io_errors"):
            problems.append("the refused read was not counted as a refused "
                            "access and an I/O error")
        if not st.get("iotlb_miss_failures"):
            problems.append("no miss was refused by QEMU")
    elif st.get("refused_accesses") or st.get("io_errors"):
        problems.append("refused accesses or I/O errors in a clean run")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", required=True)
    ap.add_argument("--mode", default="sg", choices=("sg", "window"))
    ap.add_argument("--qemu")
    ap.add_argument("--kernel", default="6.1", choices=("6.1", "6.12", "7.2"))
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--refuse", action="store_true")
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--queues", type=int, default=1,
                    help="--num-queues of the backend and num-queues of "
                    "the device")
    ap.add_argument("--verify-mib", type=int, default=8)
    ap.add_argument("--summary-file")
    ap.add_argument("--backend-log-level", default="info")
    ap.add_argument("--keep-log", help="copy the backend's log here")
    a = ap.parse_args()
    pg.interrupt_on_signals()
    qemu = a.qemu or pg.qemu_build()
    image = pg.prepare(a.kernel)
    what = (f"vhost-user-blk kernel {a.kernel} mode {a.mode}"
            f"{' strict' if a.strict else ''}{' refuse' if a.refuse else ''}"
            f"{' kill' if a.kill else ''}"
            f"{f' queues {a.queues}' if a.queues > 1 else ''}")
    failure = None
    tmp = tempfile.TemporaryDirectory(prefix="pvdma-vub-")
    backend = None
    killed = {}
    try:
        backend = Backend(a.backend, tmp.name, a.mode, a.timeout + 30,
                          log_level=a.backend_log_level,
                          extra_args=["--num-queues", str(a.queues)])
        if a.kill:
            def kill_then_check(vm):
                # Half a second into disk-verify: SIGKILL the backend;
                # 3 s later QEMU must still answer QMP; then end QEMU.
                try:
                    time.sleep(0.5)
                    os.kill(backend.pid(), signal.SIGKILL)
                    killed["at"] = vm.elapsed()
                    time.sleep(3)
                    killed["status"] = vm.qmp().execute("query-status").get("status")
                    killed["qemu_alive"] = vm.proc.poll() is None
                except Exception as e:  # reported as the failure below
                    killed["error"] = repr(e)
                finally:
                    killed["done"] = True
                    vm.close()

            def kill_watch(vm, line):
                if "RUN verify-blk" in line and "thread" not in killed:
                    killed["thread"] = threading.Thread(
                        target=kill_then_check, args=(vm,), daemon=True)
                    killed["thread"].start()
                elif "thread" in killed and "done" not in killed:
                    killed.setdefault("after_kill", []).append(line)
        try:
            r = pg.run_variant(
                qemu, image, "pvdma", strict=a.strict, mode="test",
                timeout=a.timeout, refuse=a.refuse and "both", vhost_user_blk=backend.sock,
                vhost_user_blk_opts=(f"num-queues={a.queues},disable-legacy=on,"
                                     "iommu_platform=on"),
                extra_append=["pvdmaio.disks=blk", "pvdmaio.net=0",
                              f"pvdmaio.verify_mib={a.verify_mib}"],
                on_line=kill_watch if a.kill else None)
        except KeyboardInterrupt as e:
            sys.exit(f"interrupted ({e or 'SIGINT'})")
        if a.kill:
            if "thread" in killed:
                killed["thread"].join(10)
            if "at" not in killed:
                failure = ("the guest never started disk-verify: "
                           f"{r.failure} {killed.get('error', '')}")
            elif killed.get("status") not in ("running", "paused") or \
                    not killed.get("qemu_alive"):
                failure = (f"QEMU after the kill: status {killed.get('status')}"
                           f" {killed.get('error', '')}")
            print(f"== killed the backend {killed.get('at', 0):.1f} s after "
                  f"QEMU started; QEMU then: {killed.get('status')}; guest "
                  "console after the kill:")
            for line in killed.get("after_kill", [])[-10:]:
                print("   " + line)
            rc = backend.wait(5)
            if rc != -signal.SIGKILL and rc != 128 + signal.SIGKILL:
                failure = failure or f"backend exit status {rc}, not killed"
        else:
            if not r.passed:
                failure = r.failure
            rc = backend.wait(15)
            if rc is None:
                failure = failure or "the backend did not exit after QEMU closed the socket"
            elif rc != 0 and failure is None:
                failure = f"the backend exited with status {rc}"
            st = backend.stats()
            print(f"== backend counters: {st}")
            # chains each queue served (its base at the guest's power-off)
            served = {int(q): int(b) for q, b in re.findall(
                r"queue (\d+) stopped at (\d+)", backend.text())}
            print(f"== chains per queue: {served}")
            if failure is None:
                problems = check_stats(st, a.refuse)
                if problems:
                    failure = "backend counters: " + "; ".join(problems)
    finally:
        if backend is not None:
            backend.close()
            print("== backend log (tail)")
            print("\n".join(backend.text().splitlines()[-25:]))
            if a.keep_log:
                with open(a.keep_log, "w") as f:
                    f.write(backend.text())
        tmp.cleanup()
    verdict = "PASS" if failure is None else f"FAIL: {failure}"
    line = f"{what}: {verdict}"
    print("== " + line)
    if a.summary_file:
        with open(a.summary_file, "a") as f:
            f.write(line + "\n")
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
