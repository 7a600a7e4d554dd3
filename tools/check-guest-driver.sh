#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The guest kernel code against the kernel's own style checker: runs
# checkpatch.pl --strict, taken from Debian's linux-source-6.12 (the newest
# build apt offers, checked against apt's signed indices; CHECKPATCH_SRC_VER
# and CHECKPATCH_SRC_SHA256 pin one; only checkpatch.pl and its two data
# files are kept, under ~/.cache/pvdma/checkpatch-<version>/), on
# guest/linux/ and guest/kmod/.
# Fails on any ERROR, WARNING or CHECK.
#
# Usage: tools/check-guest-driver.sh [FILE.c...]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/guest-lib.sh"

SRC_PKG=linux-source-6.12
SRC_VER=${CHECKPATCH_SRC_VER:-}
SRC_SHA256=${CHECKPATCH_SRC_SHA256:-}
if [ -z "$SRC_VER" ]; then
    apt_fresh
    SRC_VER=$(apt_version "$SRC_PKG")
    [ -n "$SRC_VER" ] || die "apt offers no $SRC_PKG"
fi
log "checkpatch.pl of $SRC_PKG $SRC_VER"
files=("$@")
[ ${#files[@]} -gt 0 ] ||
    files=("$PVDMA_ROOT"/guest/linux/*.c "$PVDMA_ROOT"/guest/kmod/*.c)

ensure_apt perl xz-utils
dir="$PVDMA_CACHE/checkpatch-$SRC_VER"
if [ ! -f "$dir/.done" ]; then
    deb=$(fetch_deb "$SRC_PKG" "$SRC_VER" "$SRC_SHA256" all)
    log "extracting checkpatch.pl from $(basename "$deb")"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    # The package holds the source as one tarball; take three files of it.
    dpkg-deb --fsys-tarfile "$deb" |
        tar -xO --wildcards './usr/src/linux-source-*.tar.xz' |
        tar -xJ -C "$dir.tmp" --strip-components=2 --wildcards \
            '*/scripts/checkpatch.pl' '*/scripts/spelling.txt' \
            '*/scripts/const_structs.checkpatch'
    rm -f "$deb"          # 150 MB for three files: keep only those
    touch "$dir.tmp/.done"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi

rc=0
for f in "${files[@]}"; do
    out=$(perl "$dir/checkpatch.pl" --strict --no-tree --terse -f "$f" || true)
    if grep -qE '(ERROR|WARNING|CHECK):' <<<"$out"; then
        printf '%s\n' "$out" >&2
        rc=1
    else
        log "checkpatch --strict: ${f#"$PVDMA_ROOT"/}: clean"
    fi
done
exit $rc
