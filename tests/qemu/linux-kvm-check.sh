#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Kernel-side check for patches/linux/*.patch (see docs/kvm-hypercall.md):
#  1. download Debian bookworm's linux-source-6.1 .deb at a pinned version
#     through a private apt configuration (the machine's /etc/apt is not
#     used or touched) and verify its pinned SHA-256;
#  2. extract the kernel tree once under $PVDMA_CACHE/linux/ (cached);
#  3. restore the files earlier runs patched, then `git apply --check` and
#     `git apply` every patches/linux/*.patch;
#  4. the kernel's own scripts/checkpatch.pl on every patch (errors fail);
#  5. x86_64 defconfig with KVM, KVM_INTEL and KVM_AMD as modules, once,
#     then modules_prepare and a build of everything in arch/x86/kvm/
#     (kvm.o, kvm-intel.o, kvm-amd.o), which includes the patched x86.c.
#
# Downloads 139 MB and unpacks a 1.5 GB tree on a cold cache (timings in
# docs/kvm-hypercall.md); not part of tools/test.sh or CI.
#
# Usage: tests/qemu/linux-kvm-check.sh
# Env:   PVDMA_CACHE        cache root (default ~/.cache/pvdma)
#        LINUX_DEB_VERSION  linux-source-6.1 version (default pinned below)
#        LINUX_DEB_SHA256   its .deb's SHA-256 (must follow the version)
#        JOBS               make -j (default: nproc)
# Installs what it needs (gcc, make, flex, bison, bc, libelf-dev, ...).
set -euo pipefail

LINUX_DEB_VERSION=${LINUX_DEB_VERSION:-6.1.176-1}
LINUX_DEB_SHA256=${LINUX_DEB_SHA256:-9305d1a151b8e83dcb88aa11361e7b9513f0c252bdf7f5647e4542762d99c094}
APT_MIRROR=${PVDMA_APT_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
JOBS=${JOBS:-$(nproc)}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
CACHE=${PVDMA_CACHE:-$HOME/.cache/pvdma}
LDIR=$CACHE/linux
APT_ROOT=$LDIR/apt
deb=$LDIR/linux-source-6.1_${LINUX_DEB_VERSION}_all.deb
tree=$LDIR/linux-source-6.1-$LINUX_DEB_VERSION
orig=$tree/.pvdma-orig            # pristine copies of files the patches touch

. "$here/../framework/lib.sh"
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

shopt -s nullglob
patches=("$repo"/patches/linux/*.patch)
((${#patches[@]})) || die "no patches/linux/*.patch"
# What a kernel build needs, installed when missing (libelf-dev: objtool).
ensure_apt gcc make flex bison bc xz-utils libelf-dev libssl-dev \
    debian-archive-keyring

t0=$SECONDS

# --- 1. download + verify ------------------------------------------------
mkdir -p "$LDIR"
if [[ ! -f $deb ]]; then
    private_apt "$APT_ROOT" \
        "deb [signed-by=$KEYRING] $APT_MIRROR bookworm main" \
        "deb [signed-by=$KEYRING] $APT_MIRROR bookworm-updates main"
    apt_opts=("${PRIVATE_APT[@]}")
    log "updating private package lists (bookworm)"
    apt-get "${apt_opts[@]}" -q update >&2
    if ! apt-cache "${apt_opts[@]}" show "linux-source-6.1=$LINUX_DEB_VERSION" >/dev/null 2>&1; then
        log "versions offered:"
        apt-cache "${apt_opts[@]}" show linux-source-6.1 2>/dev/null |
            awk '/^Version:/ { print "  " $2 }' >&2 || true
        die "linux-source-6.1 $LINUX_DEB_VERSION is no longer offered; set LINUX_DEB_VERSION and LINUX_DEB_SHA256"
    fi
    log "downloading linux-source-6.1=$LINUX_DEB_VERSION"
    (cd "$LDIR" && apt-get "${apt_opts[@]}" -q download "linux-source-6.1=$LINUX_DEB_VERSION" >&2)
fi
[[ $(sha256_of "$deb") == "$LINUX_DEB_SHA256" ]] ||
    die "$(basename "$deb"): SHA-256 $(sha256_of "$deb") != pinned $LINUX_DEB_SHA256"
log "verified $(basename "$deb")"

# --- 2. extract (cached) -------------------------------------------------
if [[ ! -f $tree/.pvdma-extracted ]]; then
    log "extracting the kernel tree into $tree"
    rm -rf "$tree" "$tree.tmp"
    mkdir -p "$tree.tmp"
    dpkg-deb --fsys-tarfile "$deb" |
        tar -xO ./usr/src/linux-source-6.1.tar.xz |
        tar -xJ -C "$tree.tmp" --strip-components=1
    mv "$tree.tmp" "$tree"
    touch "$tree/.pvdma-extracted"
fi

# --- 3. apply ------------------------------------------------------------
# Undo earlier runs: restore every file a previous patch set touched.
if [[ -d $orig ]]; then
    (cd "$orig" && find . -type f ! -name '*.pvdma-new' -print0) | while IFS= read -r -d '' f; do
        cp -p "$orig/$f" "$tree/$f"
    done
    # Files the old patches created have an empty marker: remove them.
    (cd "$orig" && find . -type f -name '*.pvdma-new' -print0) | while IFS= read -r -d '' f; do
        rm -f "$tree/${f%.pvdma-new}" "$tree/$f"
    done
fi
mkdir -p "$orig"
for p in "${patches[@]}"; do
    while IFS=$'\t' read -r _ _ f; do
        [[ -e $orig/$f || -e $orig/$f.pvdma-new ]] && continue
        mkdir -p "$(dirname "$orig/$f")"
        if [[ -e $tree/$f ]]; then cp -p "$tree/$f" "$orig/$f"
        else : >"$orig/$f.pvdma-new"; fi
    done < <(git apply --numstat "$p")
done
touch "$tree/.pvdma-applied"
for p in "${patches[@]}"; do
    (cd "$tree" && git apply --check "$p") || die "$(basename "$p") does not apply to linux $LINUX_DEB_VERSION"
    (cd "$tree" && git apply "$p")
    log "applied $(basename "$p")"
done

# --- 4. the kernel's checkpatch --------------------------------------------
rc=0
for p in "${patches[@]}"; do
    out=$(cd "$tree" && perl scripts/checkpatch.pl --no-tree -q "$p" 2>&1) || true
    errors=$(grep -c '^ERROR' <<<"$out" || true)
    warnings=$(grep -c '^WARNING' <<<"$out" || true)
    log "checkpatch $(basename "$p"): $errors error(s), $warnings warning(s)"
    grep -A3 '^\(ERROR\|WARNING\)' <<<"$out" | sed 's/^/    /' >&2 || true
    ((errors == 0)) || rc=1
done

# --- 5. configure (once) and build arch/x86/kvm ----------------------------
cd "$tree"
if [[ ! -f .pvdma-configured ]]; then
    log "configuring: x86_64 defconfig + KVM, KVM_INTEL, KVM_AMD as modules"
    make -s ARCH=x86_64 defconfig
    scripts/config -e VIRTUALIZATION -m KVM -m KVM_INTEL -m KVM_AMD
    make -s ARCH=x86_64 olddefconfig
    touch .pvdma-configured
fi
grep -qx 'CONFIG_KVM=m' .config || die "CONFIG_KVM=m did not stick"
t1=$SECONDS
log "make -j$JOBS modules_prepare"
make -s -j"$JOBS" ARCH=x86_64 modules_prepare
log "make -j$JOBS arch/x86/kvm/"
make -s -j"$JOBS" ARCH=x86_64 arch/x86/kvm/
for o in arch/x86/kvm/x86.o arch/x86/kvm/kvm.o arch/x86/kvm/kvm-intel.o arch/x86/kvm/kvm-amd.o; do
    [[ -s $o ]] || die "$o was not built"
    [[ $o -nt .pvdma-applied ]] || die "$o is older than the patches"
done
log "built arch/x86/kvm (kvm.o, kvm-intel.o, kvm-amd.o) in $((SECONDS - t1)) s; total $((SECONDS - t0)) s"

((rc == 0)) && log PASS || log FAIL
exit "$rc"
