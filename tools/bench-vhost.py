#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""vhost-user-blk benchmark (issue 11): pvdma-vhost-user-blk without an
IOMMU, behind pvdma in each access mode, and QEMU's built-in virtio-blk
behind pvdma, in one run.

With one QEMU binary, boots the Debian I/O guest (6.1 unless --kernel) (guest/io,
tests/framework/pvdma_guest.py, mode=bench, virtio-blk disk only) once per
configuration per round, interleaved (round 1: each configuration once,
round 2: again, ...), and runs back to back:

  seq128k   sequential 128 KiB O_DIRECT reads, 1 job
  rand4k    random 4 KiB O_DIRECT reads, 1 job

Configurations:

  vub-noiommu       pvdma-vhost-user-blk (sg), no IOMMU in the machine
  vub-sg            pvdma-vhost-user-blk, --access-mode sg, behind pvdma
  vub-sg-sync       the same with the guest driver's queued=0 (every map
                    and unmap a synchronous request)
  vub-window        pvdma-vhost-user-blk, --access-mode window, behind pvdma
  virtio-blk        QEMU's virtio-blk-pci behind pvdma
  vub-sg-base       vub-sg with --baseline-qemu (a before/after of a QEMU
                    change in one run)

--vs-qsd (issue 21): the backend against QEMU's own export, in one run on
the same raw image size and guest, with --queues N queues everywhere
(num-queues=N on vhost-user-blk-pci, --num-queues N for ours when N > 1):

  qsd               qemu-storage-daemon --blockdev file (cache.direct=off)
                    --export vhost-user-blk, no IOMMU
  vub-noiommu       pvdma-vhost-user-blk (sg), no IOMMU
  vub-sg            pvdma-vhost-user-blk (sg) behind pvdma, the guest
                    driver's queued requests on

and the workloads seq128k, rand4k and rand4k-4j (4 jobs). Both backends
go through the host page cache (ours: buffered preadv/pwritev; qsd:
cache.direct=off, aio=threads), and the no-IOMMU device has no
iommu_platform for either. The table adds ours/qsd and pvdma/no-IOMMU.

(behind pvdma: -device pvdma, the guest's pvdma_iommu.ko, lazy). Per
workload it records the rate the guest measured, QEMU's CPU time per I/O
(all threads; the backend's CPU is not in it), and for the backend behind
pvdma the IOTLB misses, updates and invalidations per I/O, from its
counters read (SIGUSR1) right before and after the run. It prints the
median over rounds (min-max) and writes JSON / markdown when asked. Exit
status 0 when every boot passed.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "framework"))
import pvdma_guest as pg  # noqa: E402
from pvdma_vhost import Backend, timeout_child  # noqa: E402

# label -> (pvdma_guest variant, backend access mode or None: built-in,
#           pvdma_iommu.ko parameters: -sync turns queued requests off)
CONFIGS = {
    "vub-noiommu": ("none", "sg", ""),
    "vub-sg": ("pvdma", "sg", ""),
    "vub-sg-sync": ("pvdma", "sg", "queued=0"),
    "vub-window": ("pvdma", "window", ""),
    "virtio-blk": ("pvdma", None, ""),
}
# vub-sg booted with --baseline-qemu: a before/after of a QEMU change in
# one run (added to the configs when that option is given).
BASE_CONFIGS = {"vub-sg-base": ("pvdma", "sg", "")}
# name -> (pvdmaio.bench spec with {s}, rate field, unit)
WORKLOADS = {
    "seq128k": ("blk:seq:128k:1:{s}", "mbps", "MB/s"),
    "rand4k": ("blk:rand:4k:1:{s}", "iops", "IOPS"),
}
# --vs-qsd: the storage daemon and the workloads of that comparison.
QSD_CONFIGS = ["qsd", "vub-noiommu", "vub-sg"]
# --vs-qsd --baseline-backend: the same two configs with another build
# of the backend (a before/after of a backend change in one run).
OLD_CONFIGS = {"vub-noiommu-old": ("none", "sg", ""),
               "vub-sg-old": ("pvdma", "sg", "")}
QSD_WORKLOADS = {
    "seq128k": ("blk:seq:128k:1:{s}", "mbps", "MB/s"),
    "rand4k": ("blk:rand:4k:1:{s}", "iops", "IOPS"),
    "rand4k-4j": ("blk:rand:4k:4:{s}", "iops", "IOPS"),
}
COUNTERS = ("iotlb_misses", "iotlb_updates", "iotlb_invalidations",
            "iotlb_invalidated_entries", "requests", "miss_wait_us",
            "quiesce_wait_us")


class StorageDaemon:
    """qemu-storage-daemon exporting a fresh raw image of image_mib MiB
    (the size pvdma_vhost.Backend gives ours) as vhost-user-blk, under
    `timeout` in its own process group."""

    def __init__(self, binary, tmp, timeout, queues, image_mib=64):
        self.sock = os.path.join(tmp, "qsd.sock")
        image = os.path.join(tmp, "qsd.img")
        with open(image, "wb") as f:
            f.truncate(image_mib << 20)
        self.log = os.path.join(tmp, "qsd.log")
        self.logf = open(self.log, "w")
        self.proc = subprocess.Popen(
            ["timeout", "--kill-after=5", str(int(timeout)), binary,
             "--blockdev", f"driver=file,node-name=disk,filename={image},"
                           "cache.direct=off,aio=threads",
             "--export", f"type=vhost-user-blk,id=exp0,node-name=disk,"
                         f"addr.type=unix,addr.path={self.sock},"
                         f"writable=on,num-queues={queues}"],
            stdout=self.logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                with open(self.log) as f:
                    raise RuntimeError("qemu-storage-daemon did not create "
                                       "its socket:\n" + f.read())
            time.sleep(0.05)

    def pid(self):
        """The daemon's pid (the child of `timeout`)."""
        return timeout_child(self.proc)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()


def proc_cpu(pid):
    """utime + stime of process `pid` (all its threads) in seconds, or
    None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def one_boot(qemu, image, backend_bin, label, secs, timeout, qsd=None,
             queues=1):
    """One boot of config `label`. qsd: the storage daemon binary, which
    also selects --vs-qsd (its workloads, `queues` queues, no
    iommu_platform without an IOMMU)."""
    variant, mode, modparams = {**CONFIGS, **BASE_CONFIGS, **OLD_CONFIGS,
                                "qsd": ("none", None, "")}[label]
    workloads = QSD_WORKLOADS if qsd else WORKLOADS
    specs = [workloads[w][0].format(s=f"{secs:g}") for w in workloads]
    tmp = tempfile.TemporaryDirectory(prefix="pvdma-bench-vub-")
    backend = None
    daemon = None
    snaps = {}
    boot = {"config": label, "load1_before": round(os.getloadavg()[0], 2),
            "workloads": {}}
    dev_opts = None
    if qsd:
        dev_opts = f"num-queues={queues},disable-legacy=on" + (
            ",iommu_platform=on" if variant != "none" else "")
    try:
        if label == "qsd":
            daemon = StorageDaemon(qsd, tmp.name, timeout + 30, queues)
        if mode:
            extra = ["--num-queues", str(queues)] if queues > 1 else []
            backend = Backend(backend_bin, tmp.name, mode, timeout + 30,
                              log_level="warn", extra_args=extra)
        server = backend or daemon
        server_pid = None
        # The backend's (or the daemon's) CPU time at each MARK begin: /
        # end: of the guest's timed parts, in order.
        marks = []

        def on_line(_vm, line):
            nonlocal server_pid
            at = line.find("PVDMA-IO: MARK ")
            if at >= 0 and server:
                if server_pid is None:
                    try:
                        server_pid = server.pid()
                    except (OSError, ValueError, IndexError):
                        server_pid = -1
                marks.append(proc_cpu(server_pid))
            at = line.find("PVDMA-IO: PAUSE ")
            if at >= 0 and backend:
                tag = line[at + len("PVDMA-IO: PAUSE "):].split()[0]
                snaps[tag] = backend.snapshot()
        t0 = time.monotonic()
        r = pg.run_variant(qemu, image, variant, mode="bench", bench=specs,
                           modparams=modparams, timeout=timeout, echo=False,
                           vhost_user_blk=(backend.sock if backend else
                                           daemon.sock if daemon else None),
                           vhost_user_blk_opts=dev_opts,
                           extra_append=["pvdmaio.disks=blk", "pvdmaio.net=0"],
                           on_line=on_line)
        boot.update(passed=r.passed, failure=r.failure,
                    wall_s=round(time.monotonic() - t0, 2))
        final = None
        if backend:
            backend.wait(15)
            final = backend.stats()
            boot["backend_final"] = final
        for i, (w, spec) in enumerate(zip(workloads, specs)):
            res = r.results[i] if i < len(r.results) else None
            rec = {"ok": bool(res and res.get("ios"))}
            if rec["ok"]:
                field = workloads[w][1]
                rec.update(rate=res.get(field), ios=res["ios"],
                           cpu_us_per_op=res.get("qemu_cpu_us_per_op"))
                if 2 * i + 1 < len(marks) and None not in marks[2 * i:2 * i + 2]:
                    rec["server_cpu_us_per_op"] = round(
                        (marks[2 * i + 1] - marks[2 * i]) * 1e6 / res["ios"], 2)
                b, a = snaps.get("before:" + spec), snaps.get("after:" + spec)
                if a and b:
                    for k in COUNTERS:
                        if k in a and k in b:
                            rec[k + "_per_io"] = (a[k] - b[k]) / res["ios"]
                elif backend and variant == "none" and final:
                    # no pvdma, no pauses: the whole run's counters (no
                    # IOTLB without an IOMMU: all zero)
                    for k in COUNTERS[:4]:
                        rec[k + "_per_io"] = final[k] / res["ios"]
            boot["workloads"][w] = rec
        if not r.passed:
            boot["console_tail"] = r.console[-30:]
    finally:
        if backend:
            backend.close()
        if daemon:
            daemon.close()
        tmp.cleanup()
    return boot


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt(m, digits=1):
    if m is None:
        return "n/a"
    mid, lo, hi = m
    if lo == hi:
        return f"{mid:.{digits}f}"
    return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def table(boots, labels):
    rows = ["| config | workload | rate | vs vub-noiommu | QEMU CPU us/IO "
            "| IOTLB misses/IO | updates/IO | invalidations/IO |",
            "|---|---|---|---|---|---|---|---|"]

    def rate(label, w):
        m = med([b["workloads"].get(w, {}).get("rate") for b in boots
                 if b["config"] == label and b.get("passed")])
        return m[0] if m else None
    for label in labels:
        for w, (_, _, unit) in WORKLOADS.items():
            recs = [b["workloads"].get(w, {}) for b in boots
                    if b["config"] == label and b.get("passed")]
            recs = [x for x in recs if x.get("ok")]

            def col(k, d=2):
                return fmt(med([x.get(k) for x in recs]), d)
            base, mine = rate("vub-noiommu", w), rate(label, w)
            ratio = f"{mine / base:.2f}x" if base and mine else "n/a"
            rows.append(f"| {label} | {w} | {col('rate', 1)} {unit} "
                        f"| {ratio} | {col('cpu_us_per_op', 1)} "
                        f"| {col('iotlb_misses_per_io', 3)} "
                        f"| {col('iotlb_updates_per_io', 3)} "
                        f"| {col('iotlb_invalidations_per_io', 3)} |")
    return "\n".join(rows)


def qsd_table(boots):
    """--vs-qsd: one row per workload, a column per config, the ratios
    (of the medians, and in brackets the median of the ratios of each
    round's boots, which were made minutes apart)."""
    def rate(label, w):
        return med([b["workloads"].get(w, {}).get("rate") for b in boots
                    if b["config"] == label and b.get("passed")])

    def paired(a, b, w):
        by = {}
        for x in boots:
            r = x["workloads"].get(w, {}).get("rate")
            if x.get("passed") and r:
                by.setdefault(x["round"], {})[x["config"]] = r
        return med([v[a] / v[b] for v in by.values() if a in v and b in v])

    def ratio(a, b, la=None, lb=None, w=None):
        if not (a and b):
            return "n/a"
        p = paired(la, lb, w) if la else None
        return f"{a[0] / b[0]:.2f}x" + (f" ({p[0]:.2f}x)" if p else "")
    def cpu(label, w, k):
        return fmt(med([b["workloads"].get(w, {}).get(k) for b in boots
                        if b["config"] == label and b.get("passed")]), 0)
    rows = ["| workload | qsd | ours, no IOMMU | ours, behind pvdma "
            "| ours/qsd | pvdma/no-IOMMU | IOTLB misses/IO (pvdma) "
            "| QEMU CPU us/IO (qsd / no IOMMU / pvdma) "
            "| backend CPU us/IO (qsd / no IOMMU / pvdma) "
            "| pvdma: miss wait, quiesce us/IO |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for w, (_, _, unit) in QSD_WORKLOADS.items():
        q, n, p = (rate(c, w) for c in QSD_CONFIGS)
        misses = fmt(med([b["workloads"].get(w, {}).get(
            "iotlb_misses_per_io") for b in boots
            if b["config"] == "vub-sg" and b.get("passed")]), 3)
        qcpu = " / ".join(cpu(c, w, "cpu_us_per_op") for c in QSD_CONFIGS)
        bcpu = " / ".join(cpu(c, w, "server_cpu_us_per_op")
                          for c in QSD_CONFIGS)
        waits = " / ".join(cpu("vub-sg", w, k + "_per_io")
                           for k in ("miss_wait_us", "quiesce_wait_us"))
        rows.append(f"| {w} ({unit}) | {fmt(q)} | {fmt(n)} | {fmt(p)} "
                    f"| {ratio(n, q, 'vub-noiommu', 'qsd', w)} "
                    f"| {ratio(p, n, 'vub-sg', 'vub-noiommu', w)} | {misses} "
                    f"| {qcpu} | {bcpu} | {waits} |")
    if any(b["config"] in OLD_CONFIGS for b in boots):
        rows += ["", "| workload | old, no IOMMU | old/qsd | new/old, no IOMMU "
                 "| old, behind pvdma | new/old, behind pvdma |",
                 "|---|---|---|---|---|---|"]
        for w, (_, _, unit) in QSD_WORKLOADS.items():
            q, n, p, on, op = (rate(c, w) for c in QSD_CONFIGS + list(OLD_CONFIGS))
            rows.append(
                f"| {w} ({unit}) | {fmt(on)} "
                f"| {ratio(on, q, 'vub-noiommu-old', 'qsd', w)} "
                f"| {ratio(n, on, 'vub-noiommu', 'vub-noiommu-old', w)} "
                f"| {fmt(op)} | {ratio(p, op, 'vub-sg', 'vub-sg-old', w)} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu")
    ap.add_argument("--backend", help="pvdma-vhost-user-blk (default: "
                    "cargo build --release)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--secs", type=float, default=5)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS),
                    choices=list(CONFIGS))
    ap.add_argument("--baseline-qemu",
                    help="also boot vub-sg with this QEMU (vub-sg-base)")
    ap.add_argument("--kernel", default="6.1", choices=("6.1", "6.12", "7.2"))
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--vs-qsd", action="store_true",
                    help="qemu-storage-daemon against ours (issue 21)")
    ap.add_argument("--qsd", help="qemu-storage-daemon (default: next to "
                    "the QEMU binary, storage-daemon/qemu-storage-daemon)")
    ap.add_argument("--queues", type=int, default=1,
                    help="--vs-qsd: num-queues of every config")
    ap.add_argument("--baseline-backend",
                    help="--vs-qsd, one queue: also boot vub-noiommu and "
                    "vub-sg with this backend binary (-old)")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    pg.interrupt_on_signals()
    if a.vs_qsd and not a.qemu:
        # qemu-storage-daemon from the same source and flags, next to it
        os.environ["PVDMA_QEMU_TARGETS"] = "storage-daemon/qemu-storage-daemon"
    qemu = a.qemu or pg.qemu_build()
    backend = a.backend
    if not backend:
        subprocess.run(["cargo", "build", "--quiet", "--release", "-p",
                        "pvdma-vhost-user-blk"], cwd=ROOT, check=True)
        backend = os.path.join(ROOT, "target", "release",
                               "pvdma-vhost-user-blk")
    image = pg.prepare(a.kernel)
    configs = list(a.configs)
    qsd = None
    if a.vs_qsd:
        qsd = a.qsd or os.path.join(os.path.dirname(qemu), "storage-daemon",
                                    "qemu-storage-daemon")
        if not os.access(qsd, os.X_OK):
            sys.exit(f"{qsd}: not built (PVDMA_QEMU_TARGETS="
                     "storage-daemon/qemu-storage-daemon tools/qemu-build.sh)")
        configs = list(QSD_CONFIGS)
        if a.baseline_backend:
            if a.queues != 1:
                sys.exit("--baseline-backend: one queue only")
            configs += list(OLD_CONFIGS)
    if a.baseline_qemu:
        configs.append("vub-sg-base")
    boots = []
    try:
        for rnd in range(a.rounds):
            for label in configs:
                binary = a.baseline_qemu if label in BASE_CONFIGS else qemu
                server = (a.baseline_backend if label in OLD_CONFIGS
                          else backend)
                b = one_boot(binary, image, server, label, a.secs, a.timeout,
                             qsd, a.queues)
                b["round"] = rnd + 1
                boots.append(b)
                verdict = "ok" if b.get("passed") else f"FAIL {b.get('failure')}"
                print(f"round {rnd + 1} {label}: {verdict} "
                      + json.dumps(b["workloads"]), flush=True)
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted ({e or 'SIGINT'})")
    md = qsd_table(boots) if qsd else table(boots, configs)
    head = (f"vhost-user-blk benchmark{' against qemu-storage-daemon' if qsd else ''}: "
            f"{a.rounds} rounds x {a.secs:g} s per "
            f"workload, kernel {a.kernel}, TCG, 2 vCPUs, "
            f"{a.queues if qsd else 1} queue(s), {platform.node()}, "
            f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head)
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"head": head, "boots": boots}, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(head + "\n\n" + md + "\n")
    return 0 if all(b.get("passed") for b in boots) else 1


if __name__ == "__main__":
    sys.exit(main())
