#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Checks the QEMU patch series:
#  1. qemu-glue/ and patches/ agree: the series is regenerated from
#     qemu-glue/series.toml into a temporary directory and must be
#     byte-identical to the committed patches/0003-* and cover-letter.txt
#     (run tools/make-patches.py after editing qemu-glue/);
#  2. QEMU's scripts/checkpatch.pl (from the pristine 10.2.2 tree) passes on
#     every patch: errors fail the check, warnings are listed.
#
# Usage: tools/check-patches.sh
# Needs a QEMU tree with the pristine commit under $PVDMA_CACHE (made by
# tools/qemu-build.sh), or PVDMA_QEMU_SRC pointing at one.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
repo=$PVDMA_ROOT
CACHE=${PVDMA_CACHE:-$HOME/.cache/pvdma}
PRISTINE=$(sed -n 's/^PRISTINE_COMMIT = "\(.*\)"/\1/p' "$here/make-patches.py")


src=${PVDMA_QEMU_SRC:-}
if [[ -z $src ]]; then
    for d in "$CACHE"/*/src; do
        if git -C "$d" rev-parse -q --verify "$PRISTINE^{commit}" >/dev/null 2>&1; then
            src=$d
            break
        fi
    done
fi
[[ -n $src ]] || { log "no QEMU tree with commit $PRISTINE; run tools/qemu-build.sh"; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- 1. regenerate and compare ---------------------------------------------
python3 "$here/make-patches.py" --qemu-src "$src" --out "$tmp/patches"
rc=0
for f in "$tmp"/patches/* "$repo"/patches/*; do
    name=$(basename "$f")
    [[ $name == 000[12]-* ]] && continue
    # patches/linux/ holds the host-kernel patch, checked by
    # tests/qemu/linux-kvm-check.sh, and patches/libvirt/ the libvirt
    # series (tests/qemu/libvirt-series-test.sh): not the QEMU series.
    [[ -d $f ]] && continue
    if ! cmp -s "$tmp/patches/$name" "$repo/patches/$name"; then
        log "DIFFERS: patches/$name (run tools/make-patches.py and commit)"
        diff -u "$repo/patches/$name" "$tmp/patches/$name" 2>&1 | head -40 >&2 || true
        rc=1
    fi
done
((rc == 0)) && log "patches/ matches qemu-glue/series.toml"

# --- 2. checkpatch -----------------------------------------------------------
git -C "$src" show "$PRISTINE:scripts/checkpatch.pl" >"$tmp/checkpatch.pl"
for p in "$repo"/patches/0[0-9][0-9][0-9]-*.patch; do
    out=$(cd "$src" && perl "$tmp/checkpatch.pl" --no-tree -q "$p" 2>&1) && status=0 || status=$?
    errors=$(grep -c '^ERROR' <<<"$out" || true)
    warnings=$(grep -c '^WARNING' <<<"$out" || true)
    log "$(basename "$p"): $errors error(s), $warnings warning(s)"
    grep -A2 '^\(ERROR\|WARNING\)' <<<"$out" | sed 's/^/    /' >&2 || true
    if ((errors > 0 || status != 0 && warnings == 0)); then
        rc=1
    fi
done
((rc == 0)) && log PASS || log FAIL
exit "$rc"
