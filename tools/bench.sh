#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs every benchmark (cargo bench -p pvdma-benches, release profile), then
# prints a summary: the mean time per operation of each benchmark and, for
# each pvdma variant, its speed-up over each baseline measured in the same
# run (ratios survive a loaded machine; absolute times do not).
#
#   tools/bench.sh                 run everything, then summarise
#   tools/bench.sh --summary-only  summarise the last run's results
#   tools/bench.sh -- ARGS         pass ARGS to the criterion binaries
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$PVDMA_ROOT"

run=1
args=()
while [ $# -gt 0 ]; do
    case $1 in
    --summary-only) run=0 ;;
    --) shift; args=("$@"); break ;;
    *) echo "usage: $0 [--summary-only] [-- criterion args]" >&2; exit 2 ;;
    esac
    shift
done

if [ $run -eq 1 ]; then
    ensure_rust_build_deps
    log "load before: $(uptime)"
    cargo bench -p pvdma-benches -- --noplot "${args[@]}"
    log "load after: $(uptime)"
fi

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

python3 - "$target_dir/criterion" <<'PY'
import json
import os
import sys

root = sys.argv[1]
# Every benchmark id is group/function[/parameter]; "new" is the last run.
results = {}
for dirpath, _, files in os.walk(root):
    if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
        continue
    with open(os.path.join(dirpath, "estimates.json")) as f:
        mean = json.load(f)["mean"]["point_estimate"]
    with open(os.path.join(dirpath, "benchmark.json")) as f:
        meta = json.load(f)
    per = (meta.get("throughput") or {}).get("Elements", 1)
    parts = meta["full_id"].split("/")
    group, function = parts[0], parts[1]
    param = parts[2] if len(parts) > 2 else ""
    results[(group, param, function)] = mean / per

if not results:
    sys.exit(f"no criterion results under {root}")

def fmt(ns):
    return f"{ns / 1000:.2f} us" if ns >= 10_000 else f"{ns:.2f} ns"

baselines = ("vmm_iotlb_rwlock", "btreemap_mutex")
print()
print("| group | size | benchmark | ns/op (mean) | vs vm-memory Iotlb | vs BTreeMap |")
print("|---|---|---|---:|---:|---:|")
for (group, param, function) in sorted(results, key=lambda k: (k[0], int(k[1] or 0), k[2])):
    ns = results[(group, param, function)]
    cells = []
    for base in baselines:
        # A variant's baseline: the one with the same suffix (_64seg), or
        # for the concurrent group the same scenario (readers_alone, ...).
        suffix = next((s for s in ("_64seg",) if function.endswith(s)), "")
        ref = None
        if function.startswith("pvdma_"):
            same = function.replace("pvdma_", base.rsplit("_", 1)[0] + "_", 1)
            ref = results.get((group, param, same)) or results.get((group, param, base + suffix))
        cells.append(f"{ref / ns:.1f}x" if ref else "")
    print(f"| {group} | {param} | {function} | {fmt(ns)} | {cells[0]} | {cells[1]} |")

# Concurrent: what the writer costs each kind of reader.
c = {f: ns for (g, _, f), ns in results.items() if g == "concurrent"}
if c:
    print()
    # M translations/s per reader; the CPU hog is the control for CPU sharing.
    print("| concurrent readers | alone | with CPU hog | with writer | writer slow-down | of which CPU sharing |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("pvdma", "pvdma_table", "vmm_iotlb"):
        alone = c.get(f"{kind}_readers_alone")
        hog = c.get(f"{kind}_readers_with_cpu_hog")
        busy = c.get(f"{kind}_readers_with_writer")
        if alone and busy:
            hog_cells = (f"{1e3 / hog:.1f}", f"{hog / alone:.2f}x") if hog else ("", "")
            print(f"| {kind} | {1e3 / alone:.1f} | {hog_cells[0]} | {1e3 / busy:.1f} "
                  f"| {busy / alone:.2f}x | {hog_cells[1]} |")

# Refused UNMAPs in a big domain: each against a successful one-page
# MAP + UNMAP of the same run and domain (the cost must not grow with it).
u = {f: ns for (g, _, f), ns in results.items() if g == "unmap_refused"}
ok = u.get("ok_map_unmap")
if ok:
    print()
    print("| refused UNMAP (400,000 records) | ns | / ok_map_unmap |")
    print("|---|---:|---:|")
    for f in sorted(u):
        if f != "ok_map_unmap":
            print(f"| {f} | {fmt(u[f])} | {u[f] / ok:.2f}x |")

# Queued requests: per one-page MAP + UNMAP pair taken from a queue,
# against the same pairs as synchronous requests (same run, same domain).
q = {f: ns for (g, _, f), ns in results.items() if g == "queue_drain"}
sub, exe = q.get("pvdma_submit"), q.get("pvdma_execute")
if sub and exe:
    print()
    print("| queued MAP+UNMAP pair | ns/pair | / pvdma_submit | / pvdma_execute |")
    print("|---|---:|---:|---:|")
    for f in sorted(q):
        print(f"| {f} | {fmt(q[f])} | {q[f] / sub:.2f}x | {q[f] / exe:.2f}x |")
PY
