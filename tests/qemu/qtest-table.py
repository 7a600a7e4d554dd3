#!/usr/bin/env python3
"""Side-by-side table of two meson test logs (meson-logs/*.json).

Usage: qtest-table.py STOCK.json PATCHED.json
Prints a Markdown table (test, stock result and time, patched result and
time), marks rows whose results differ, and exits 1 when the patched build
does not pass a test that passes on stock (or a test only it has fails).
"""
import json
import sys

PASS = {"OK", "SKIP", "EXPECTEDFAIL"}


def load(path):
    results = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            entry = json.loads(line)
            name = entry["name"].rsplit("/", 1)[-1].strip()
            results[name] = (entry["result"], float(entry["duration"]))
    return results


def cell(entry):
    if entry is None:
        return "—", "—"
    return entry[0], f"{entry[1]:.1f} s"


def main():
    stock, patched = load(sys.argv[1]), load(sys.argv[2])
    print("| test | stock | time | patched | time | |")
    print("| --- | --- | ---: | --- | ---: | --- |")
    regressions = []
    totals = [0.0, 0.0]
    for name in sorted(set(stock) | set(patched)):
        s, p = stock.get(name), patched.get(name)
        totals[0] += s[1] if s else 0
        totals[1] += p[1] if p else 0
        mark = ""
        if s is None or p is None:
            mark = "only in " + ("patched" if s is None else "stock")
        elif s[0] != p[0]:
            mark = "differs"
        if p is not None and p[0] not in PASS and (s is None or s[0] == "OK"):
            regressions.append(name)
            mark = "REGRESSION" if s else "FAILS (patched only)"
        print(f"| {name} | {' | '.join(cell(s))} | {' | '.join(cell(p))} | {mark} |")
    print(f"| total | | {totals[0]:.0f} s | | {totals[1]:.0f} s | |")
    for kind, res in (("stock", stock), ("patched", patched)):
        counts = {}
        for r, _ in res.values():
            counts[r] = counts.get(r, 0) + 1
        summary = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        print(f"\n{kind}: {len(res)} tests: {summary}", end="")
    print()
    if regressions:
        print("patched fails where stock passes: " + " ".join(regressions),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
