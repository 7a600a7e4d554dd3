#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Build the QEMU patch series from qemu-glue/ (the one source of truth).

qemu-glue/series.toml lists the patches in order. Each patch names the new
files it introduces (paths under qemu-glue/ mirror QEMU's tree) and the
edits it makes to existing QEMU files (insert text after/before a unique
anchor, replace a unique anchor, or append). New files may hold stage
markers, lines containing

    @series-begin NAME   ...   @series-end NAME    (from patch NAME on)
    @series-until NAME   ...   @series-end NAME    (before patch NAME only)

so one file (e.g. hw/misc/pvdma.c) grows over several bisectable patches. The
marker lines themselves never reach QEMU. See qemu-glue/README.md.

The series is built on the pristine QEMU tree (the `pristine` commit that
tools/qemu-build.sh makes from Debian's tarball, the same id on every
machine) plus patches/0001-0002, as commits with a fixed author and date,
and written with `git format-patch --zero-commit -N`.

usage: make-patches.py [--out DIR] [--qemu-src DIR] [--sync TREE [--stage N]]
  --out DIR     where to write 0003-*.patch... and cover-letter.txt
                (default: patches/ of this repository)
  --sync TREE   also make QEMU tree TREE look like the series after patch N
                (default: all), copying only files whose contents differ so
                that an incremental build there rebuilds only what changed
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(REPO, "qemu-glue")
QEMU_VERSION = "10.2.2"
# tools/qemu-build.sh commits the tarball with fixed identity and dates,
# so this is the pristine commit on every machine.
PRISTINE_COMMIT = "f7c96624"
BASE_PATCHES = 2        # patches/0001, 0002: kept as they are
AUTHOR = "pvdma developers <pvdma@example.invalid>"
DATE = "2026-11-24T09:00:00+00:00"
MARK = re.compile(r"@series-(begin|until|end)\s+([\w-]+)")


def die(msg):
    sys.exit(f"make-patches: {msg}")


def git(cwd, *args, env=None, capture=True):
    e = dict(os.environ)
    e.update({"GIT_AUTHOR_NAME": "pvdma developers",
              "GIT_AUTHOR_EMAIL": "pvdma@example.invalid",
              "GIT_COMMITTER_NAME": "pvdma developers",
              "GIT_COMMITTER_EMAIL": "pvdma@example.invalid",
              "GIT_AUTHOR_DATE": DATE, "GIT_COMMITTER_DATE": DATE})
    if env:
        e.update(env)
    r = subprocess.run(["git", "-c", "commit.gpgsign=false",
                        "-c", "core.autocrlf=false", *args], cwd=cwd, env=e,
                       text=True, capture_output=capture)
    if r.returncode:
        die(f"git {' '.join(args)} failed in {cwd}:\n{r.stderr}")
    return r.stdout if capture else ""


def render(text, stage_of, stage, path):
    """Keep what belongs to patch index `stage`; drop marker lines."""
    out, stack = [], []
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        m = MARK.search(line)
        if not m:
            if all(stack):
                out.append(line)
            continue
        kind, name = m.groups()
        if name not in stage_of:
            die(f"{path}:{n}: unknown stage {name!r}")
        if kind == "end":
            if not stack:
                die(f"{path}:{n}: @series-end without begin")
            stack.pop()
        elif kind == "begin":
            stack.append(stage >= stage_of[name])
        else:
            stack.append(stage < stage_of[name])
    if stack:
        die(f"{path}: unterminated @series marker")
    return "".join(out)


def apply_edit(tree, edit, where):
    path = os.path.join(tree, edit["file"])
    with open(path, encoding="utf-8") as f:
        s = f.read()
    text = edit["insert"]
    if "after" in edit or "before" in edit or "replace" in edit:
        anchor = edit.get("after", edit.get("before", edit.get("replace")))
        if s.count(anchor) != 1:
            die(f"{where}: anchor occurs {s.count(anchor)} times in "
                f"{edit['file']}:\n{anchor}")
        i = s.index(anchor) + (len(anchor) if "after" in edit else 0)
        j = i + (len(anchor) if "replace" in edit else 0)
        s = s[:i] + text + s[j:]
    elif edit.get("append"):
        s += text
    else:
        die(f"{where}: edit of {edit['file']} needs after, before, "
            "replace or append")
    with open(path, "w", encoding="utf-8") as f:
        f.write(s)


def find_pristine(cache):
    """A QEMU source repository that has the pristine commit."""
    cands = []
    for d in sorted(os.listdir(cache)) if os.path.isdir(cache) else []:
        cands.append(os.path.join(cache, d, "src"))
    for c in cands:
        if not os.path.isdir(os.path.join(c, ".git")):
            continue
        r = subprocess.run(["git", "-C", c, "rev-parse", "--verify", "-q",
                            PRISTINE_COMMIT + "^{commit}"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            return c
    die(f"no QEMU tree with the pristine commit under {cache}: "
        "run tools/qemu-build.sh once, or pass --qemu-src")


def load_series():
    with open(os.path.join(GLUE, "series.toml"), "rb") as f:
        series = tomllib.load(f)
    patches = series["patch"]
    stage_of = {}
    for i, p in enumerate(patches):
        if p["stage"] in stage_of:
            die(f"stage {p['stage']} defined twice")
        stage_of[p["stage"]] = i
    return series, patches, stage_of


def build(src, work):
    series, patches, stage_of = load_series()
    git(REPO, "clone", "-q", "--shared", "--no-checkout", src, work)
    git(work, "checkout", "-q", "-b", "series", PRISTINE_COMMIT)
    base = sorted(os.listdir(os.path.join(REPO, "patches")))
    base = [os.path.join(REPO, "patches", p) for p in base
            if re.match(r"\d{4}-", p)][:BASE_PATCHES]
    git(work, "am", "-q", "--committer-date-is-author-date", *base)
    introduced = []
    for i, p in enumerate(patches):
        where = f"patch {i + BASE_PATCHES + 1} ({p['stage']})"
        introduced += p.get("files", [])
        for rel in introduced:
            with open(os.path.join(GLUE, rel), encoding="utf-8") as f:
                text = render(f.read(), stage_of, i, rel)
            dest = os.path.join(work, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w", encoding="utf-8") as f:
                f.write(text)
        for edit in p.get("edit", []):
            apply_edit(work, edit, where)
        git(work, "add", "-A")
        msg = (p["subject"] + "\n\n" + p["body"].strip() +
               f"\n\nSigned-off-by: {AUTHOR}\n")
        r = subprocess.run(["git", "-c", "commit.gpgsign=false", "commit",
                            "-q", "-F", "-"], cwd=work, input=msg, text=True,
                           capture_output=True,
                           env={**os.environ,
                                "GIT_AUTHOR_NAME": "pvdma developers",
                                "GIT_AUTHOR_EMAIL": "pvdma@example.invalid",
                                "GIT_COMMITTER_NAME": "pvdma developers",
                                "GIT_COMMITTER_EMAIL": "pvdma@example.invalid",
                                "GIT_AUTHOR_DATE": DATE,
                                "GIT_COMMITTER_DATE": DATE})
        if r.returncode:
            die(f"{where}: commit failed:\n{r.stdout}{r.stderr}")
    return series, patches


def write_patches(work, out, series, patches):
    n = len(patches)
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        if re.match(r"\d{4}-", f) and int(f[:4]) > BASE_PATCHES:
            os.remove(os.path.join(out, f))
    git(work, "format-patch", "-q", "--zero-commit", "-N", "--no-signature",
        f"--start-number={BASE_PATCHES + 1}", "-o", out, f"HEAD~{n}..HEAD")
    total = BASE_PATCHES + n
    shortlog = git(work, "shortlog", f"HEAD~{total}..HEAD")
    stat = git(work, "diff", "--stat=72", f"HEAD~{total}..HEAD")
    cover = series["cover"]
    text = (f"From 0000000000000000000000000000000000000000 Mon Sep 17 "
            f"00:00:00 2001\nFrom: {AUTHOR}\n"
            f"Subject: [PATCH 0/{total}] {cover['subject']}\n\n"
            f"{cover['body'].strip()}\n\n{shortlog.rstrip()}\n\n"
            f"{stat.rstrip()}\n\n-- \npvdma developers\n")
    with open(os.path.join(out, "cover-letter.txt"), "w") as f:
        f.write(text)


def sync(work, tree, stage):
    """Make `tree` match the series after `stage` patches, mtime-friendly."""
    _, patches, _ = load_series()
    n = len(patches)
    rev = f"HEAD~{n - stage}" if stage < n else "HEAD"
    base = f"HEAD~{n}"
    changed = git(work, "diff", "--name-only", base, "HEAD").split()
    for rel in changed:
        dest = os.path.join(tree, rel)
        r = subprocess.run(["git", "-C", work, "show", f"{rev}:{rel}"],
                           capture_output=True)
        if r.returncode:
            want = None
            r2 = subprocess.run(["git", "-C", work, "show", f"{base}:{rel}"],
                                capture_output=True)
            want = r2.stdout if r2.returncode == 0 else None
        else:
            want = r.stdout
        have = None
        if os.path.exists(dest):
            with open(dest, "rb") as f:
                have = f.read()
        if want == have:
            continue
        if want is None:
            os.remove(dest)
            print(f"removed {rel}")
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(want)
            print(f"updated {rel}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "patches"))
    ap.add_argument("--qemu-src")
    ap.add_argument("--sync")
    ap.add_argument("--stage", type=int)
    ap.add_argument("--keep", action="store_true",
                    help="keep (and print) the temporary QEMU clone")
    a = ap.parse_args()
    cache = os.environ.get("PVDMA_CACHE",
                           os.path.expanduser("~/.cache/pvdma"))
    src = a.qemu_src or find_pristine(cache)
    tmp = tempfile.mkdtemp(prefix="pvdma-series-")
    try:
        work = os.path.join(tmp, "qemu")
        series, patches = build(src, work)
        if a.sync:
            sync(work, a.sync, len(patches) if a.stage is None else a.stage)
        else:
            write_patches(work, a.out, series, patches)
    finally:
        if a.keep:
            print(tmp)
        else:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
