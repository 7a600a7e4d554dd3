#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Extract Debian 12's libvirt 9.0.0 orig tarball (tools/libvirt-fetch.sh),
# apply patches/libvirt/0*.patch with `git am`, configure a minimal build
# (the QEMU driver, the remote driver, libvirtd, virsh and the tests;
# every other feature off) and build it. Everything lives under a cache
# directory keyed by the libvirt version and a hash of the patch series and
# the meson options, so a second run with unchanged inputs does no work
# (only a no-op ninja). See docs/libvirt.md.
#
# Usage: tools/libvirt-build.sh
# Env:   PVDMA_CACHE       cache root (default ~/.cache/pvdma)
#        PVDMA_JOBS        parallel build jobs (default 2)
#        PVDMA_SKIP_APT=1  do not install missing build dependencies
# Prints the meson build directory on its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
repo=$PVDMA_ROOT

LIBVIRT_VERSION=9.0.0
CACHE=$PVDMA_CACHE
JOBS=${PVDMA_JOBS:-2}

# Only what the pvdma series and its tests need; auto_features=disabled
# turns every optional dependency and driver off unless named here.
MESON_OPTIONS=(
    -Dauto_features=disabled
    -Ddriver_qemu=enabled
    -Ddriver_remote=enabled
    -Ddriver_libvirtd=enabled
    -Dyajl=enabled
    -Dtests=enabled
    -Dexpensive_tests=disabled
    -Ddocs=disabled
    -Dgit_werror=disabled
    # the source is a git tree of our own, without the submodules meson
    # would otherwise try to update
    -Dno_git=true
    -Dinit_script=none
    -Dsystem=false
)

# Debian 12 packages (libvirt's Build-Depends, the subset the options above use).
BUILD_DEPS=(
    build-essential meson ninja-build pkgconf git xz-utils
    libglib2.0-dev libxml2-dev libxml2-utils xsltproc libgnutls28-dev
    libtirpc-dev libyajl-dev python3-docutils
)

now() { date +%s; }

patches=("$repo"/patches/libvirt/0[0-9][0-9][0-9]-*.patch)
[[ -e ${patches[0]} ]] || patches=()
key=$(
    {
        for p in "${patches[@]}"; do
            printf '%s\n' "$(basename "$p")"; cat "$p"
        done
        printf '%s\n' "${MESON_OPTIONS[@]}"
    } | sha256sum | cut -c1-12
)
WORK=$CACHE/libvirt-$LIBVIRT_VERSION-$key
SRC=$WORK/src
BUILD=$WORK/build

# Several checkouts share the cache: one at a time builds a given key.
mkdir -p "$CACHE"
exec {lock_fd}>"$WORK.lock"
if ! flock -n "$lock_fd"; then
    log "waiting for another build of $(basename "$WORK") to finish"
    flock "$lock_fd"
fi

# Fast path: patched and configured; ninja alone (a no-op when built).
if [[ ! -f $WORK/.pvdma-patched || ! -f $BUILD/.pvdma-configured ]]; then
    if [[ ${PVDMA_SKIP_APT:-0} == 1 ]]; then
        for p in "${BUILD_DEPS[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
                die "missing package $p (PVDMA_SKIP_APT=1)"
        done
    else
        ensure_apt "${BUILD_DEPS[@]}"
    fi
    orig=$("$here/libvirt-fetch.sh" | tail -n1)
fi

if [[ ! -f $WORK/.pvdma-patched ]]; then
    t0=$(now)
    rm -rf "$WORK"
    mkdir -p "$SRC"
    log "extracting $(basename "$orig")"
    tar -xJf "$orig" -C "$SRC" --strip-components=1 --no-same-owner
    (
        cd "$SRC"
        export GIT_AUTHOR_DATE="2000-01-01T00:00:00Z" GIT_COMMITTER_DATE="2000-01-01T00:00:00Z"
        git_id=(-c user.name="pvdma build" -c user.email=pvdma@example.invalid
                -c commit.gpgsign=false -c init.defaultBranch=pvdma)
        # Upstream, src/keycodemapdb is a git submodule, so libvirt's
        # syntax-check (which walks `git ls-files`) never looks into it;
        # the tarball has it as plain files. Make it a repository of its
        # own again, which the outer one records as a gitlink.
        git "${git_id[@]}" -C src/keycodemapdb init -q
        git "${git_id[@]}" -C src/keycodemapdb add -A -f
        git "${git_id[@]}" -C src/keycodemapdb commit -q -m "keycodemapdb (from the libvirt tarball)"
        git "${git_id[@]}" init -q
        git "${git_id[@]}" -c advice.addEmbeddedRepo=false add -A -f
        git "${git_id[@]}" commit -q -m "libvirt $LIBVIRT_VERSION (Debian orig tarball)"
        git tag pristine
        if ((${#patches[@]})); then
            log "applying ${#patches[@]} patch(es)"
            git "${git_id[@]}" am -q --committer-date-is-author-date "${patches[@]}" >&2
        fi
    )
    touch "$WORK/.pvdma-patched"
    log "extract+patch: $(($(now) - t0))s"
fi

if [[ ! -f $BUILD/.pvdma-configured ]]; then
    t0=$(now)
    rm -rf "$BUILD"
    log "meson setup ${MESON_OPTIONS[*]}"
    nice -n 10 meson setup "$BUILD" "$SRC" "${MESON_OPTIONS[@]}" \
        >"$WORK/pvdma-configure.log" 2>&1 ||
        { tail -n 40 "$WORK/pvdma-configure.log" >&2; die "meson setup failed (see $WORK/pvdma-configure.log)"; }
    touch "$BUILD/.pvdma-configured"
    log "configure: $(($(now) - t0))s"
fi

t0=$(now)
log "building with -j$JOBS"
nice -n 10 ninja -C "$BUILD" -j"$JOBS" >"$BUILD/pvdma-build.log" 2>&1 ||
    { tail -n 40 "$BUILD/pvdma-build.log" >&2; die "build failed (see $BUILD/pvdma-build.log)"; }
log "build: $(($(now) - t0))s"

for bin in src/libvirtd tools/virsh tests/qemuxml2argvtest; do
    [[ -x $BUILD/$bin ]] || die "no $bin in $BUILD"
done
echo "$BUILD"
