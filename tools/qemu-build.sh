#!/usr/bin/env bash
# Extract Debian's qemu orig tarball, apply patches/0*.patch with `git am`,
# configure a minimal x86_64-softmmu and build it. Everything is cached under
# a directory keyed by QEMU version + hash of the patch series, so a second run
# with unchanged inputs does no work.
#
# The pvdma library (libpvdma.a, our Rust core) is built first with the
# project's own meson build (build/meson), staged into the cache directory
# with a pvdma.pc, and QEMU is configured with --enable-pvdma and
# PKG_CONFIG_PATH pointing there (see docs/building-qemu.md, "Linking").
#
# Usage: tools/qemu-build.sh
# Env:   PVDMA_CACHE         cache root (default ~/.cache/pvdma)
#        PVDMA_JOBS          parallel build jobs (default 2)
#        PVDMA_SKIP_APT=1    do not apt-get install missing build dependencies
#        PVDMA_MESON_BUILD   our meson build dir (default <repo>/build/meson)
#        PVDMA_QEMU_TARGETS  more ninja targets to build beside the system
#                            emulator, e.g. storage-daemon/qemu-storage-daemon
#        PVDMA_QEMU_STOCK=1  build the same orig tarball without the pvdma
#                            series (only the pc-bios build fixes 0001-0002,
#                            which +ds needs to configure), the same configure
#                            flags minus --enable-pvdma and no libpvdma, in
#                            its own cache directory
#                            qemu-<version>-stock-<key>; the reference for
#                            tests/qemu/qtest-compare.sh
# Prints the path of qemu-system-x86_64 on its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
repo=$PVDMA_ROOT

QEMU_VERSION=10.2.2
CACHE=${PVDMA_CACHE:-$HOME/.cache/pvdma}
DL=$CACHE/dl
JOBS=${PVDMA_JOBS:-2}
# Debian 12's own interpreter (python3-venv), not whatever python3 is on PATH,
# so the configure-time venv is the same on every machine of this kind.
PYTHON=/usr/bin/python3

# The +ds tarball has python/wheels emptied and Debian 12's meson (1.0) is
# older than QEMU 10.2 accepts (>= 1.5). We fetch the exact wheels QEMU's
# pythondeps.toml names from PyPI, pin them by SHA-256, and drop them into
# python/wheels so configure's mkvenv installs them offline.
WHEELS=(
    "meson-1.9.0-py3-none-any.whl 45e51ddc41e37d961582d06e78c48e0f9039011587f3495c4d6b0781dad92357"
    "pycotap-1.3.1-py3-none-any.whl 1c3a25b3ff89e48f4e00f1f71dbbc1642b4f65c65d416524d07e73492fff25ea"
)

# Firmware comes from Debian packages (seabios, qemu-system-data, ipxe-qemu);
# the build is told where they live so neither -L nor an install is needed.
# A binary run from the build tree looks for each of these under
# build/qemu-bundle/ instead, so link_firmware mirrors them there.
FIRMWARE_DIRS=(/usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu)
FIRMWARE_PATH=$(IFS=:; echo "${FIRMWARE_DIRS[*]}")

CONFIGURE_ARGS=(
    --target-list=x86_64-softmmu
    --without-default-features
    --python="$PYTHON"
    --disable-download
    --disable-docs
    --disable-install-blobs
    --firmwarepath="$FIRMWARE_PATH"
    --enable-tcg
    --enable-kvm
    --enable-pvdma
    # vhost-user-blk-pci, for pvdma-vhost-user-blk (docs/vhost-user.md)
    --enable-vhost-user
    # qemu-storage-daemon with its vhost-user-blk export, the baseline of
    # tools/bench-vhost.py (built only when asked, see PVDMA_QEMU_TARGETS)
    --enable-tools
    --enable-vhost-user-blk-server
)

# Stock mode: what only the series adds (the --enable-pvdma option and
# libpvdma's pkg-config path) is left out; everything else is identical.
STOCK=${PVDMA_QEMU_STOCK:-0}
if [[ $STOCK == 1 ]]; then
    args=()
    for a in "${CONFIGURE_ARGS[@]}"; do
        [[ $a == --enable-pvdma ]] || args+=("$a")
    done
    CONFIGURE_ARGS=("${args[@]}")
fi

BUILD_DEPS=(
    build-essential ninja-build pkgconf python3-venv python3-pip meson
    libglib2.0-dev zlib1g-dev flex bison
    git xz-utils bzip2
    seabios qemu-system-data ipxe-qemu
    # libpvdma itself (built first): bindgen needs libclang.
    libclang-dev clang
)

now() { date +%s; }

install_missing_deps() {
    local missing=() pkg
    for pkg in "${BUILD_DEPS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null |
            grep -q 'install ok installed' || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ ${PVDMA_SKIP_APT:-0} == 1 ]] && die "missing packages: ${missing[*]}"
    log "installing: ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

fetch_wheels() {
    local entry name sum
    mkdir -p "$DL/wheels"
    for entry in "${WHEELS[@]}"; do
        read -r name sum <<<"$entry"
        if [[ ! -f $DL/wheels/$name ]]; then
            local version=${name#*-}; version=${version%%-*}
            log "downloading $name from PyPI"
            "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
                -d "$DL/wheels" "${name%%-*}==$version" >&2
        fi
        [[ $(sha256sum "$DL/wheels/$name" | cut -d' ' -f1) == "$sum" ]] ||
            die "$name: SHA-256 does not match pinned $sum"
    done
}

# The cache key covers every input that changes the source tree (the patch
# files' names and contents, in am order) and the configure arguments, so
# that checkouts asking for different QEMU features never reconfigure one
# another's build back and forth.
patches=("$repo"/patches/0[0-9][0-9][0-9]-*.patch)
[[ -e ${patches[0]} ]] || patches=()
# Stock mode keeps only the build fixes the Debian +ds tarball needs to
# configure at all (patches touching nothing but pc-bios/: 0001, 0002);
# none of them changes a line of C.
if [[ $STOCK == 1 ]]; then
    stock=()
    for p in "${patches[@]}"; do
        grep '^diff --git a/' "$p" | grep -qv '^diff --git a/pc-bios/' ||
            stock+=("$p")
    done
    patches=("${stock[@]}")
fi
patch_hash=$(
    {
        for p in "${patches[@]}"; do
            printf '%s\n' "$(basename "$p")"; cat "$p"
        done
        printf '%s\n' "${CONFIGURE_ARGS[@]}"
    } | sha256sum | cut -c1-12
)
WORK=$CACHE/qemu-$QEMU_VERSION-$patch_hash
[[ $STOCK == 1 ]] && WORK=$CACHE/qemu-$QEMU_VERSION-stock-$patch_hash
SRC=$WORK/src
BUILD=$WORK/build
BIN=$BUILD/qemu-system-x86_64

# Several checkouts (clones, worktrees, CI jobs) share the cache: one of
# them at a time extracts, configures, stages the library and builds a
# given key. The lock is released when this script exits.
mkdir -p "$CACHE"
exec {lock_fd}>"$WORK.lock"
if ! flock -n "$lock_fd"; then
    log "waiting for another build of $(basename "$WORK") to finish"
    flock "$lock_fd"
fi

# --- the pvdma library -------------------------------------------------------
# Build libpvdma.a with the project's meson (cargo underneath; a no-op when
# nothing changed) and stage it, its headers and a pvdma.pc under $WORK/pvdma.
# Staging decouples the QEMU build from the worktree it was started from
# (several worktrees share one cache directory) and gives ninja a stable
# path: a file is copied only when its contents changed, so a changed
# libpvdma.a relinks QEMU and a changed header recompiles hw/misc/pvdma*.c,
# while an unchanged library costs nothing. The cache key P therefore stays
# the patch series only; the library is an input of the incremental build.
MESON_BUILD=${PVDMA_MESON_BUILD:-$repo/build/meson}
STAGE=$WORK/pvdma
stage_file() {   # stage_file SRC DEST: copy when the contents differ
    mkdir -p "$(dirname "$2")"
    cmp -s "$1" "$2" || cp "$1" "$2"
}
build_pvdma_lib() {
    [[ $STOCK == 1 ]] && return 0
    local t0; t0=$(now)
    if [[ ! -f $MESON_BUILD/build.ninja ]]; then
        log "meson setup $MESON_BUILD (pvdma library)"
        meson setup "$MESON_BUILD" "$repo" >&2 ||
            die "meson setup of the pvdma library failed"
    fi
    # Re-running meson (when meson.build changed) also rewrites pvdma.pc.
    ninja -C "$MESON_BUILD" libpvdma.a >&2 ||
        die "building libpvdma.a failed"
    stage_file "$MESON_BUILD/libpvdma.a" "$STAGE/lib/libpvdma.a"
    local h
    for h in "$repo"/rust-core/include/*.h; do
        stage_file "$h" "$STAGE/include/$(basename "$h")"
    done
    # The generated .pc names the worktree's paths; point it at the stage.
    sed -e "s|^includedir=.*|includedir=$STAGE/include|" \
        -e "s|[^ ]*/libpvdma\.a|$STAGE/lib/libpvdma.a|" \
        "$MESON_BUILD/pvdma.pc" >"$STAGE/pvdma.pc.new"
    if cmp -s "$STAGE/pvdma.pc.new" "$STAGE/pvdma.pc"; then
        rm "$STAGE/pvdma.pc.new"
    else
        mv "$STAGE/pvdma.pc.new" "$STAGE/pvdma.pc"
    fi
    log "pvdma library: $(($(now) - t0))s"
}
[[ $STOCK == 1 ]] || export PKG_CONFIG_PATH=$STAGE${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}

# The .pc contents (flags, staged paths) are part of the configure key: a
# change there reconfigures; a changed libpvdma.a only relinks.
configure_key() {
    { printf '%s\n' "${CONFIGURE_ARGS[@]}"; cat "$STAGE/pvdma.pc" 2>/dev/null || true; } |
        sha256sum | cut -c1-12
}

# Fast path: with the tree patched and configured as asked, only ninja (which
# is a no-op when nothing changed) has to run; skip deps, fetch and wheels.
fast=0
if [[ -f $WORK/.pvdma-patched ]]; then
    build_pvdma_lib
fi
configure_key=$(configure_key)
if [[ -f $WORK/.pvdma-patched && -f $BUILD/.pvdma-configured &&
      $(cat "$BUILD/.pvdma-configured") == "$configure_key" ]]; then
    fast=1
fi

if ((!fast)); then
    install_missing_deps
    orig=$("$here/qemu-fetch.sh" | tail -n1)
    fetch_wheels
fi

# --- extract + patch ------------------------------------------------------
if [[ ! -f $WORK/.pvdma-patched ]]; then
    t0=$(now)
    rm -rf "$WORK"
    mkdir -p "$SRC"
    log "extracting $(basename "$orig")"
    tar -xJf "$orig" -C "$SRC" --strip-components=1
    (
        cd "$SRC"
        export GIT_AUTHOR_DATE="2000-01-01T00:00:00Z" GIT_COMMITTER_DATE="2000-01-01T00:00:00Z"
        git_id=(-c user.name="pvdma build" -c user.email=pvdma@example.invalid
                -c commit.gpgsign=false -c init.defaultBranch=pvdma)
        git "${git_id[@]}" init -q
        git "${git_id[@]}" add -A -f
        git "${git_id[@]}" commit -q -m "qemu $QEMU_VERSION (Debian +ds orig tarball)"
        git tag pristine
        # Build inputs that are not part of the source history.
        cp "$DL"/wheels/*.whl python/wheels/
        printf '/python/wheels/*.whl\n' >>.git/info/exclude
        if ((${#patches[@]})); then
            log "applying ${#patches[@]} patch(es)"
            git "${git_id[@]}" am -q --committer-date-is-author-date "${patches[@]}" >&2
        fi
    )
    touch "$WORK/.pvdma-patched"
    log "extract+patch: $(($(now) - t0))s"
    build_pvdma_lib
    configure_key=$(configure_key)
fi

# --- configure --------------------------------------------------------------
if [[ ! -f $BUILD/.pvdma-configured ||
      $(cat "$BUILD/.pvdma-configured") != "$configure_key" ]]; then
    t0=$(now)
    rm -rf "$BUILD"
    mkdir -p "$BUILD"
    log "configure ${CONFIGURE_ARGS[*]}"
    (cd "$BUILD" && "$SRC/configure" "${CONFIGURE_ARGS[@]}" >"$BUILD/pvdma-configure.log" 2>&1) ||
        { tail -n 40 "$BUILD/pvdma-configure.log" >&2; die "configure failed (see $BUILD/pvdma-configure.log)"; }
    echo "$configure_key" >"$BUILD/.pvdma-configured"
    log "configure: $(($(now) - t0))s"
fi

# --- build ------------------------------------------------------------------
t0=$(now)
log "building with -j$JOBS"
# shellcheck disable=SC2086 # a list of targets
ninja -C "$BUILD" -j"$JOBS" qemu-system-x86_64 ${PVDMA_QEMU_TARGETS:-} >"$BUILD/pvdma-build.log" 2>&1 ||
    { tail -n 40 "$BUILD/pvdma-build.log" >&2; die "build failed (see $BUILD/pvdma-build.log)"; }
log "build: $(($(now) - t0))s"

# QEMU finds its data relative to the executable when build/qemu-bundle
# exists: configured firmware dirs D become build/qemu-bundle/D. Point those
# at the Debian packages' directories so the build-tree binary and qtests
# find bios-256k.bin, vgabios-*.bin and the option ROMs with no -L.
link_firmware() {
    local dir link
    for dir in "${FIRMWARE_DIRS[@]}"; do
        [[ -d $dir ]] || die "firmware directory $dir missing (package not installed?)"
        link=$BUILD/qemu-bundle$dir
        [[ -L $link && $(readlink "$link") == "$dir" ]] && continue
        mkdir -p "$(dirname "$link")"
        rm -rf "$link"
        ln -s "$dir" "$link"
    done
}

[[ -x $BIN ]] || die "no binary at $BIN"
link_firmware
echo "$BIN"
