#!/usr/bin/env python3
"""Print the ninja targets a meson test suite of a QEMU build depends on.

Usage: qtest-suite-deps.py BUILD SUITE   e.g. ... build qtest-x86_64
       qtest-suite-deps.py --names BUILD SUITE   the suite's test names

`meson test` builds every default target first; the suite only needs its
test executables and what their `depends:` name (the emulator, qemu-img,
the storage daemon), which meson's introspection data lists.
"""
import json
import os
import sys


def main():
    names = sys.argv[1] == "--names"
    build, suite = sys.argv[1 + names], sys.argv[2 + names]
    info = os.path.join(build, "meson-info")
    with open(os.path.join(info, "intro-tests.json")) as f:
        tests = json.load(f)
    with open(os.path.join(info, "intro-targets.json")) as f:
        targets = {t["id"]: t for t in json.load(f)}
    wanted = set()
    for test in tests:
        if "qemu:" + suite not in test["suite"] and suite not in test["suite"]:
            continue
        if names:
            wanted.add(test["name"])
            continue
        wanted.add(os.path.relpath(test["cmd"][0], build))
        for dep in test["depends"]:
            for fn in targets.get(dep, {}).get("filename", []):
                wanted.add(os.path.relpath(fn, build))
    if not wanted:
        sys.exit(f"no tests in suite {suite} under {build}")
    print("\n".join(sorted(wanted)))


if __name__ == "__main__":
    main()
