#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The shell library of every script under tools/ and tests/ (tests source it
# through tests/framework/lib.sh): the repository root, the cache, logging,
# and installing what a script needs.

PVDMA_CACHE=${PVDMA_CACHE:-$HOME/.cache/pvdma}
PVDMA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Messages go to stderr, tagged with the script's name (PVDMA_TAG overrides).
PVDMA_TAG=${PVDMA_TAG:-$(basename "$0" .sh)}
log() { printf '[%s] %s\n' "$PVDMA_TAG" "$*" >&2; }
die() {
    printf '[%s] ERROR: %s\n' "$PVDMA_TAG" "$*" >&2
    exit 1
}

# ensure_apt PKG...: installs the Debian packages that are missing.
ensure_apt() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_cargo_tool BIN CRATE VERSION: installs a pinned cargo tool under
# the cache (never into the user's ~/.cargo/bin) and puts it on PATH.
ensure_cargo_tool() {
    local bin=$1 crate=$2 version=$3
    local root="$PVDMA_CACHE/tools/$crate-$version"
    export PATH="$root/bin:$PATH"
    [ -x "$root/bin/$bin" ] && return 0
    log "installing $crate $version"
    cargo install --quiet --locked --root "$root" "$crate" --version "=$version"
}

# The Rust side needs libclang (bindgen), meson and ninja for the C tests.
ensure_rust_build_deps() {
    ensure_apt libclang-dev clang meson ninja-build pkg-config gcc
    command -v cargo >/dev/null || {
        echo "cargo not found: install Rust (rustup) first" >&2
        exit 1
    }
}

# private_apt ROOT LINE...: an apt configuration of our own under ROOT whose
# sources.list holds the LINEs (never the machine's /etc/apt), and the -o
# options every apt-get / apt-cache call must take in PRIVATE_APT.
private_apt() {
    local root=$1
    shift
    mkdir -p "$root"/{etc/apt.conf.d,etc/preferences.d,etc/trusted.gpg.d,etc/sources.list.d,lists/partial,cache/archives/partial}
    printf '%s\n' "$@" >"$root/etc/sources.list"
    touch "$root/status"
    PRIVATE_APT=(
        -o "Dir::Etc::SourceList=$root/etc/sources.list"
        -o "Dir::Etc::SourceParts=$root/etc/sources.list.d"
        -o "Dir::Etc::Parts=$root/etc/apt.conf.d"
        -o "Dir::Etc::PreferencesParts=$root/etc/preferences.d"
        -o "Dir::Etc::TrustedParts=$root/etc/trusted.gpg.d"
        -o "Dir::State=$root"
        -o "Dir::State::Lists=$root/lists"
        -o "Dir::State::status=$root/status"
        -o "Dir::Cache=$root/cache"
        -o "Dir::Cache::Archives=$root/cache/archives"
        # The _apt sandbox user cannot write below root's 0700 home.
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
        -o "APT::Architecture=amd64"
    )
}
