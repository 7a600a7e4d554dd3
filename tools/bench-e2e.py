#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""End-to-end I/O benchmark: pvdma against no IOMMU, intel-iommu and
virtio-iommu, in Debian guests (issue 9).

With one QEMU binary, in one run, boots the I/O guest (guest/io,
tests/framework/pvdma_guest.py) once per kernel and variant per round, the
variants interleaved (round 1: every variant once, round 2: again, ...),
so that a change of load on the machine hits every variant alike. Each
boot runs the workloads back to back (mode=bench):

  seq128k    virtio-blk, sequential 128 KiB reads, 1 job
  rand4k-1j  virtio-blk, random 4 KiB reads, 1 job
  rand4k-4j  virtio-blk, random 4 KiB reads, 4 jobs
  net        virtio-net, 1500-byte frames from one NIC to the other

and records per workload (a) the rate the guest measured (MB/s for
seq128k and net, IOPS for rand4k), (b) QEMU's host CPU time per I/O (or
frame) during the timed part, all threads (steadier than wall time on a
shared machine; under TCG it includes the guest's own CPU work), (c) for
pvdma variants, pvdma requests per I/O from query-pvdma's request
counters read right before and right after the run (n/a when the QEMU
does not report them).

Then it prints per (kernel, variant, workload) the median over rounds
(min-max), the rate and the CPU per I/O relative to `none` of the same
kernel and workload, and the issue's targets (recorded, never asserted:
the exit status is 0 whatever they show, 1 only when no boot passed).

Variants: none, pvdma, pvdma-strict, pvdma-sync, pvdma-sync-strict,
intel, intel-strict, virtio, virtio-strict (lazy unless -strict:
iommu.strict=1; pvdma queued unless -sync: the guest driver's queued=0).
virtio is skipped on kernels without virtio-iommu (Debian's 6.1 cloud
kernel).
"""

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "framework"))
import pvdma_guest as pg  # noqa: E402

# label -> (pvdma_guest variant, strict, pvdma_iommu.ko parameters).
# pvdma and pvdma-strict use the guest driver's default, queued requests
# (ABI section 3.2) when the device offers them; the -sync variants turn
# them off (queued=0): every map and unmap is a request, as before.
VARIANTS = {
    "none": ("none", False, ""),
    "pvdma": ("pvdma", False, ""),
    "pvdma-strict": ("pvdma", True, ""),
    "pvdma-sync": ("pvdma", False, "queued=0"),
    "pvdma-sync-strict": ("pvdma", True, "queued=0"),
    "intel": ("intel", False, ""),
    "intel-strict": ("intel", True, ""),
    "virtio": ("virtio", False, ""),
    "virtio-strict": ("virtio", True, ""),
}
# The same pvdma variants booted with --baseline-qemu: a before/after of a
# change to QEMU or the library in one run.
BASE_VARIANTS = {
    "pvdma-base": ("pvdma", False, ""),
    "pvdma-base-strict": ("pvdma", True, ""),
}
DEFAULT_VARIANTS = list(VARIANTS)
VARIANTS.update(BASE_VARIANTS)
# name -> (pvdmaio.bench spec with {s} for the seconds, RESULT kind,
#          rate field, rate unit)
WORKLOADS = {
    "seq128k": ("blk:seq:128k:1:{s}", "disk", "mbps", "MB/s"),
    "rand4k-1j": ("blk:rand:4k:1:{s}", "disk", "iops", "IOPS"),
    "rand4k-4j": ("blk:rand:4k:4:{s}", "disk", "iops", "IOPS"),
    "net": ("net:{s}", "net", "mbps", "MB/s"),
}
REQ_KINDS = ("query", "attach", "detach", "map", "unmap", "unmap-list",
             "queue", "sync", "other")
TRANSPORTS = ("doorbell", "hypercall")
# Per-I/O request figures kept per workload (besides the total).
REQ_SHOWN = ("map", "unmap", "unmap-list", "sync")


def counters(snapshot, field, keys):
    """Sum over the pvdma devices of query-pvdma's `field` counters (a
    dict), or None when the reply has no such counters."""
    if not snapshot:
        return None
    out = dict.fromkeys(keys, 0)
    for dev in snapshot:
        c = dev.get(field)
        if not isinstance(c, dict):
            return None
        for k in keys:
            out[k] += int(c.get(k, 0))
    return out


def delta(after, before):
    if after is None or before is None:
        return None
    return {k: after[k] - before[k] for k in after}


def workload_record(name, spec, res, snaps):
    """One workload of one boot, from its RESULT dict and the snapshots."""
    _, kind, field, _ = WORKLOADS[name]
    rec = {"workload": name, "spec": spec, "ok": False}
    if res is None or res.get("kind") != kind:
        return rec
    ops = res.get("ios", res.get("frames", 0))
    rec.update(ok=bool(ops), rate=res.get(field), ops=ops,
               secs=res.get("secs"), iops=res.get("iops"),
               fps=res.get("fps"), mbps=res.get("mbps"),
               lost=res.get("lost"), qemu_cpu_s=res.get("qemu_cpu_s"),
               cpu_us_per_op=res.get("qemu_cpu_us_per_op"))
    before, after = snaps.get("before:" + spec), snaps.get("after:" + spec)
    req = delta(counters(after, "requests", REQ_KINDS),
                counters(before, "requests", REQ_KINDS))
    rec["requests"] = req
    rec["transports"] = delta(counters(after, "transports", TRANSPORTS),
                              counters(before, "transports", TRANSPORTS))
    if req is not None and ops:
        rec["req_per_op"] = sum(req.values()) / ops
        for k in REQ_SHOWN:
            rec[k + "_per_op"] = req[k] / ops
    return rec


def one_boot(qemu, image, label, workloads, secs, timeout):
    """Boots one variant, runs the workloads; a JSON-able dict."""
    variant, strict, modparams = VARIANTS[label]
    specs = [WORKLOADS[w][0].format(s=f"{secs:g}") for w in workloads]
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    r = pg.run_variant(qemu, image, variant, strict=strict, mode="bench",
                       bench=specs, modparams=modparams, timeout=timeout,
                       echo=False)
    boot = {"kernel": image.kernel, "variant": label, "passed": r.passed,
            "failure": r.failure, "load1_before": round(load, 2),
            "wall_s": round(time.monotonic() - t0, 2), "times": r.times,
            "cpu_total_s": r.cpu_total_s, "workloads": {}}
    for i, (w, spec) in enumerate(zip(workloads, specs)):
        res = r.results[i] if i < len(r.results) else None
        boot["workloads"][w] = workload_record(w, spec, res, r.snapshots)
    if not r.passed:
        boot["console_tail"] = r.console[-40:]
    return boot


def fmt(x, digits=None):
    if x is None:
        return "n/a"
    if digits is not None:
        return f"{x:.{digits}f}"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def fx(x):
    return "n/a" if x is None else f"{x:.2f}x"


def stats(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v),
            "n": len(v)}


def _median(row, field):
    return row[field]["median"] if row and row.get(field) else None


def aggregate(boots, kernels, labels, workloads):
    """(kernel, variant, workload) -> medians and ratios to none."""
    agg = {}
    for k in kernels:
        for w in workloads:
            for v in labels:
                recs = [b["workloads"][w] for b in boots
                        if b["kernel"] == k and b["variant"] == v
                        and b["passed"] and b["workloads"].get(w, {}).get("ok")]
                if not recs:
                    continue
                row = {"n": len(recs)}
                for f in ("rate", "cpu_us_per_op", "req_per_op",
                          *(x + "_per_op" for x in REQ_SHOWN)):
                    row[f] = stats([r.get(f) for r in recs])
                agg[(k, v, w)] = row
            base = agg.get((k, "none", w))
            for v in labels:
                row = agg.get((k, v, w))
                if row is None:
                    continue
                row["rate_vs_none"] = ratio(_median(row, "rate"),
                                            _median(base, "rate"))
                row["cpu_vs_none"] = ratio(_median(row, "cpu_us_per_op"),
                                           _median(base, "cpu_us_per_op"))
    return agg


def med(agg, k, v, w, f):
    return _median(agg.get((k, v, w)), f)


def targets(agg, kernels, workloads):
    """The issue's targets, each a dict with met True/False/None."""
    out = []

    def add(k, w, what, value, limit, le=False):
        met = None if value is None else (value <= limit if le
                                          else value >= limit)
        out.append({"kernel": k, "workload": w, "check": what,
                    "value": value, "target": ("<= " if le else ">= ")
                    + (f"{limit:g}" if le else f"{limit:g}x"), "met": met})

    # Issue 20's targets (queued requests): pvdma and pvdma-strict are
    # the guest driver's default, queued mode.
    for k in kernels:
        for w in workloads:
            pl = med(agg, k, "pvdma", w, "rate")
            ps = med(agg, k, "pvdma-strict", w, "rate")
            add(k, w, "pvdma lazy rate / none",
                ratio(pl, med(agg, k, "none", w, "rate")), 0.9)
            add(k, w, "pvdma lazy rate / intel lazy",
                ratio(pl, med(agg, k, "intel", w, "rate")), 1.0)
            add(k, w, "pvdma lazy QEMU CPU per I/O / none",
                ratio(med(agg, k, "pvdma", w, "cpu_us_per_op"),
                      med(agg, k, "none", w, "cpu_us_per_op")), 1.15,
                le=True)
            add(k, w, "pvdma strict rate / intel strict",
                ratio(ps, med(agg, k, "intel-strict", w, "rate")), 1.0)
            if w != "net":
                add(k, w, "pvdma lazy requests per I/O",
                    med(agg, k, "pvdma", w, "req_per_op"), 0.1, le=True)
            if w.startswith("rand4k"):
                add(k, w, "pvdma strict requests per I/O",
                    med(agg, k, "pvdma-strict", w, "req_per_op"), 1.1,
                    le=True)
    return out


def tables(agg, checks, kernels, labels, workloads):
    """Markdown: one table per kernel, then the targets."""
    lines = []
    for k in kernels:
        lines += [f"Kernel {k}: median over rounds (min-max); \"vs none\" "
                  "is the ratio of medians to `none` of the same kernel "
                  "and workload; requests are pvdma requests per I/O "
                  "(frame for net).", "",
                  "| workload | variant | rate | min-max | rate vs none | "
                  "QEMU CPU us/IO | CPU vs none | req/IO | map/IO | "
                  "unmap/IO | unmap-list/IO | sync/IO | n |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for w in workloads:
            unit = WORKLOADS[w][3]
            for v in labels:
                row = agg.get((k, v, w))
                if row is None:
                    continue
                r, c = row["rate"], row["cpu_us_per_op"]
                pv = VARIANTS[v][0] == "pvdma"

                def q(f):
                    s = row.get(f)
                    return fmt(s["median"], 2) if s else ("n/a" if pv else "")
                lines.append(
                    f"| {w} | {v} | {fmt(r['median'])} {unit} | "
                    f"{fmt(r['min'])}-{fmt(r['max'])} | "
                    f"{fx(row['rate_vs_none'])} | "
                    f"{fmt(c['median']) if c else 'n/a'} | "
                    f"{fx(row['cpu_vs_none'])} | {q('req_per_op')} | "
                    f"{q('map_per_op')} | {q('unmap_per_op')} | "
                    f"{q('unmap-list_per_op')} | {q('sync_per_op')} | "
                    f"{row['n']} |")
        lines.append("")
    lines += ["Targets (issue 20; recorded, not asserted):", "",
              "| kernel | workload | check | value | target | met |",
              "|---|---|---|---:|---:|---|"]
    for t in checks:
        val = t["value"]
        shown = "n/a" if val is None else (
            f"{val:.2f}" if "requests" in t["check"] else f"{val:.2f}x")
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['kernel']} | {t['workload']} | {t['check']} | "
                     f"{shown} | {t['target']} | {met} |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Run:
    meta: dict
    boots: list


def write_outputs(a, run, kernels, labels, workloads):
    agg = aggregate(run.boots, kernels, labels, workloads)
    checks = targets(agg, kernels, workloads)
    md = tables(agg, checks, kernels, labels, workloads)
    if a.json:
        out = {"meta": run.meta, "boots": run.boots,
               "aggregate": [{"kernel": k, "variant": v, "workload": w, **row}
                             for (k, v, w), row in agg.items()],
               "targets": checks}
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, a.json)
    if a.markdown:
        m = run.meta
        head = (f"Command: `{m['command']}`  \n"
                f"Date: {m['date']}; host {m['host']}, {m['cpus']} CPUs; "
                f"QEMU `{m['qemu']}`"
                + (f" (pvdma-base: `{m['baseline_qemu']}`)"
                   if m.get("baseline_qemu") else "")
                + f"; commit {m['commit']}; "
                f"{m['rounds_done']} of {m['rounds']} rounds, "
                f"{m['secs']:g} s per workload; "
                f"1-minute load {m['load_min']}-{m['load_max']} "
                f"(before each boot); {m['boots_passed']} of "
                f"{m['boots_run']} boots passed"
                f"{'; INTERRUPTED' if m.get('interrupted') else ''}.\n\n")
        with open(a.markdown, "w") as f:
            f.write(head + md)
    return md


def git_head():
    try:
        return subprocess.run(["git", "-C", HERE, "describe", "--always",
                               "--dirty"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


class Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C (run_variant ends QEMU)."""

    def __init__(self, signum):
        super().__init__(f"signal {signum}")
        self.signum = signum


def on_signal(signum, _frame):
    raise Stop(signum)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Example: tools/bench-e2e.sh --rounds 2 --secs 3 "
        "--json e2e.json --markdown e2e.md")
    ap.add_argument("--qemu", help="QEMU binary (default: qemu-build.sh's)")
    ap.add_argument("--baseline-qemu", metavar="BIN",
                    help="also boot the pvdma variants with this QEMU, as "
                    "pvdma-base and pvdma-base-strict (before/after of a "
                    "change in one run)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--secs", type=float, default=3,
                    help="seconds per workload (timed part)")
    ap.add_argument("--kernels", nargs="+", default=["6.1", "6.12", "7.2"],
                    choices=("6.1", "6.12", "7.2"))
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    choices=DEFAULT_VARIANTS)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                    choices=list(WORKLOADS))
    ap.add_argument("--timeout", type=float,
                    help="hard limit per boot, seconds (default 90 + "
                    "(2 x secs + 8) per workload)")
    ap.add_argument("--json", help="write boots, medians and targets here")
    ap.add_argument("--markdown", help="write the Markdown tables here")
    a = ap.parse_args()
    if a.rounds < 1 or a.secs <= 0:
        ap.error("--rounds must be >= 1 and --secs > 0")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    wanted = set(a.variants)
    if a.baseline_qemu:
        wanted |= {b for b, (_, strict, _) in BASE_VARIANTS.items()
                   if ("pvdma-strict" if strict else "pvdma") in wanted}
    labels = [v for v in VARIANTS if v in wanted]   # canonical order
    workloads = [w for w in WORKLOADS if w in a.workloads]
    timeout = a.timeout or 90 + len(workloads) * (2 * a.secs + 8)
    qemu = a.qemu or pg.qemu_build()
    images = {k: pg.prepare(k) for k in a.kernels}
    plan = []                       # (kernel, label) per boot of a round
    for k in a.kernels:
        for v in labels:
            if VARIANTS[v][0] == "virtio" and not images[k].virtio_iommu:
                print(f"== kernel {k}: no virtio-iommu driver, skipping {v}")
                continue
            if VARIANTS[v][0] == "pvdma" and not images[k].pvdma_iommu:
                print(f"== kernel {k}: no pvdma_iommu.ko, skipping {v}")
                continue
            plan.append((k, v))
    cmd = os.environ.get("PVDMA_BENCH_CMD") or " ".join(
        [os.path.relpath(sys.argv[0])] + [shlex.quote(x) for x in sys.argv[1:]])
    loads = []
    run = Run({"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
               "host": platform.node(), "cpus": os.cpu_count(),
               "qemu": qemu, "baseline_qemu": a.baseline_qemu,
               "commit": git_head(),
               "kernels": {k: i.release for k, i in images.items()},
               "rounds": a.rounds, "rounds_done": 0, "secs": a.secs,
               "timeout_s": timeout, "workloads": {
                   w: WORKLOADS[w][0].format(s=f"{a.secs:g}")
                   for w in workloads},
               "load_min": None, "load_max": None, "boots_run": 0,
               "boots_passed": 0}, [])
    print(f"== {len(plan)} boots per round, {a.rounds} rounds, "
          f"{a.secs:g} s per workload, timeout {timeout:.0f} s per boot; "
          f"QEMU {qemu}", flush=True)
    t_start = time.monotonic()
    status = 0
    try:
        for rnd in range(1, a.rounds + 1):
            for k, v in plan:
                binary = a.baseline_qemu if v in BASE_VARIANTS else qemu
                b = one_boot(binary, images[k], v, workloads, a.secs, timeout)
                b["round"] = rnd
                run.boots.append(b)
                loads.append(b["load1_before"])
                m = run.meta
                m.update(boots_run=len(run.boots), load_min=min(loads),
                         load_max=max(loads), boots_passed=sum(
                             x["passed"] for x in run.boots))
                parts = []
                for w in workloads:
                    rec = b["workloads"][w]
                    if not rec["ok"]:
                        parts.append(f"{w} -")
                        continue
                    rq = rec.get("req_per_op")
                    parts.append(
                        f"{w} {fmt(rec['rate'])} {WORKLOADS[w][3]} "
                        f"{fmt(rec['cpu_us_per_op'])} us/IO"
                        + (f" {rq:.2f} req/IO" if rq is not None else ""))
                verdict = "PASS" if b["passed"] else f"FAIL ({b['failure']})"
                print(f"[round {rnd}/{a.rounds} {time.monotonic() - t_start:5.0f} s]"
                      f" {k} {v}: {verdict}, {b['wall_s']:.0f} s, load "
                      f"{b['load1_before']}; " + "; ".join(parts), flush=True)
                write_outputs(a, run, a.kernels, labels, workloads)
            run.meta["rounds_done"] = rnd
    except KeyboardInterrupt as e:
        print(f"== interrupted ({e or 'SIGINT'}); QEMU ended, writing what "
              "was measured", flush=True)
        run.meta["interrupted"] = True
        status = 128 + getattr(e, "signum", signal.SIGINT)
    md = write_outputs(a, run, a.kernels, labels, workloads)
    print()
    print(md)
    if status == 0 and not run.meta["boots_passed"]:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
