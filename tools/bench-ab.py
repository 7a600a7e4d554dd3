#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""A/B two builds of one criterion benchmark binary, in one run.

    tools/bench-ab.py A_BINARY B_BINARY FILTER [ROUNDS]

A_BINARY and B_BINARY are the same bench target built from two trees
(`cargo bench -p pvdma-benches --no-run` prints its path, e.g.
target/release/deps/translate_hit-<hash>). The two run in alternating
order for ROUNDS rounds (default 6), each round a short criterion run of
the benchmarks matching FILTER (a criterion regex) in a scratch directory,
so both see the same machine load over time; the table gives the median
over rounds of each side's mean time per element and B's time over A's
(below 1: B is faster). On a shared machine, read the ratio, not the
absolute times, and repeat a ratio within 10% of 1 before calling it.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def run(binary, filt, workdir):
    """Mean ns per element of each benchmark id in one criterion run."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    subprocess.run([binary, "--bench", "--noplot", "--warm-up-time", "0.5",
                    "--measurement-time", "1.5", filt], cwd=workdir,
                   stdout=subprocess.DEVNULL, check=True,
                   env=dict(os.environ, CARGO_TARGET_DIR=workdir))
    out = {}
    for dirpath, _, files in os.walk(workdir):
        if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(dirpath, "estimates.json")) as f:
            mean = json.load(f)["mean"]["point_estimate"]
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            meta = json.load(f)
        per = (meta.get("throughput") or {}).get("Elements", 1)
        out[meta["full_id"]] = mean / per
    return out


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    binaries = {"A": os.path.abspath(sys.argv[1]),
                "B": os.path.abspath(sys.argv[2])}
    filt, rounds = sys.argv[3], int(sys.argv[4]) if len(sys.argv) == 5 else 6
    samples = {"A": {}, "B": {}}
    with tempfile.TemporaryDirectory(prefix="pvdma-ab-") as tmp:
        for r in range(rounds):
            for side in ("AB" if r % 2 == 0 else "BA"):
                for bench, ns in run(binaries[side], filt,
                                     os.path.join(tmp, side)).items():
                    samples[side].setdefault(bench, []).append(ns)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    print("| benchmark | A ns | B ns | B/A time |")
    print("|---|---:|---:|---:|")
    for bench in sorted(samples["A"]):
        if bench not in samples["B"]:
            continue
        a = statistics.median(samples["A"][bench])
        b = statistics.median(samples["B"][bench])
        print(f"| {bench} | {a:.2f} | {b:.2f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
