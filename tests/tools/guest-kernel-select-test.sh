#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Unit test of guest_kernel_select (tools/guest-lib.sh) against a fake apt:
# a stand-in apt-cache on PATH answers from a table, so the choice of build
# is checked without the network and whatever the archive holds today.
#   - the newest complete build of the series is taken (6.1.0-57 over -50,
#     numerically: -9 < -10 < -57);
#   - a build whose headers or kbuild apt lacks (an upload in progress) is
#     passed over for the next one;
#   - PVDMA_GUEST_KERNEL_PIN=1 gives the pinned build with its SHA-256s,
#     PVDMA_GUEST_ABI_6_1 one ABI at apt's version;
#   - no complete build at all is an error, not a silent fallback.
# Prints "N passed, N failed".
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT

# The fake apt's table: "package version" lines, one per available build.
cat >"$fake/table" <<'T'
linux-image-6.1.0-9-cloud-amd64 6.1.27-1
linux-headers-6.1.0-9-cloud-amd64 6.1.27-1
linux-headers-6.1.0-9-common 6.1.27-1
linux-image-6.1.0-10-cloud-amd64 6.1.38-1
linux-headers-6.1.0-10-cloud-amd64 6.1.38-1
linux-headers-6.1.0-10-common 6.1.38-1
linux-image-6.1.0-57-cloud-amd64 6.1.192-3
linux-headers-6.1.0-57-cloud-amd64 6.1.192-3
linux-headers-6.1.0-57-common 6.1.192-3
linux-image-6.1.0-58-cloud-amd64 6.1.193-1
linux-headers-6.1.0-58-cloud-amd64 6.1.193-1
linux-kbuild-6.1 6.1.27-1
linux-kbuild-6.1 6.1.38-1
linux-kbuild-6.1 6.1.192-3
linux-image-6.1.0-50-cloud-amd64 6.1.176-1
linux-image-6.12.117+deb12-cloud-amd64-unsigned 6.12.117-1~deb12u1
linux-headers-6.12.117+deb12-cloud-amd64 6.12.117-1~deb12u1
linux-headers-6.12.117+deb12-common 6.12.117-1~deb12u1
linux-kbuild-6.12.117+deb12 6.12.117-1~deb12u1
linux-image-6.12.118+deb12-cloud-amd64-unsigned 6.12.118-1~deb12u1
linux-headers-6.12.118+deb12-cloud-amd64 6.12.118-1~deb12u1
linux-headers-6.12.118+deb12-common 6.12.118-1~deb12u1
T
cat >"$fake/apt-cache" <<'A'
#!/usr/bin/env bash
table=$(dirname "$0")/table
case $1 in
pkgnames) awk -v p="$2" 'index($1, p) == 1 { print $1 }' "$table" | sort -u ;;
policy)
    v=$(awk -v p="$2" '$1 == p { print $2 }' "$table" | sort -V | tail -n1)
    echo "$2:"; echo "  Candidate: ${v:-(none)}" ;;
show)
    pkg=${2%%=*} ver=${2#*=}
    awk -v p="$pkg" -v v="$ver" '$1 == p && $2 == v { f = 1 } END { exit !f }' "$table" &&
        printf 'Package: %s\nVersion: %s\nSHA256: 00\n' "$pkg" "$ver" ;;
*) exit 1 ;;
esac
A
chmod +x "$fake/apt-cache"
export PATH="$fake:$PATH" PVDMA_CACHE="$fake/cache"
mkdir -p "$PVDMA_CACHE" && touch "$PVDMA_CACHE/apt-lists-updated"

. "$root/tools/lib.sh"
. "$root/tools/guest-lib.sh"

passed=0 failed=0
check() {
    local what=$1 got=$2 want=$3
    if [ "$got" = "$want" ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL: $what: got '$got', want '$want'" >&2
    fi
}

# 6.1.0-58 has no -common header package and no kbuild at its version: the
# newest complete build is 6.1.0-57.
guest_kernel_select 6.1 2>/dev/null
check "6.1 newest complete" "$GK_IMAGE_PKG $GK_VER $GK_RELEASE" \
    "linux-image-6.1.0-57-cloud-amd64 6.1.192-3 6.1.0-57-cloud-amd64"
check "6.1 kbuild" "$GK_KBUILD_PKG $GK_HEADERS_VER" "linux-kbuild-6.1 6.1.192-3"
check "6.1 hashes from apt's index" "$GK_IMAGE_SHA256$GK_HEADERS_SHA256" ""

# 6.12.118 lacks its kbuild package: 6.12.117 is taken.
guest_kernel_select 6.12 2>/dev/null
check "6.12 newest complete" "$GK_IMAGE_PKG $GK_KBUILD_PKG $GK_VER" \
    "linux-image-6.12.117+deb12-cloud-amd64-unsigned linux-kbuild-6.12.117+deb12 6.12.117-1~deb12u1"

PVDMA_GUEST_KERNEL_PIN=1 guest_kernel_select 6.1 2>/dev/null
check "pinned 6.1" "$GK_IMAGE_PKG $GK_VER ${GK_IMAGE_SHA256:0:8}" \
    "linux-image-6.1.0-50-cloud-amd64 6.1.176-1 efe19f60"

PVDMA_GUEST_ABI_6_1=6.1.0-10 guest_kernel_select 6.1 2>/dev/null
check "one ABI" "$GK_IMAGE_PKG $GK_VER" "linux-image-6.1.0-10-cloud-amd64 6.1.38-1"

sed -i '/common/d' "$fake/table"
if (guest_kernel_select 6.1 2>/dev/null); then rc=0; else rc=1; fi
check "no complete build is an error" "$rc" 1

echo "guest-kernel-select: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
