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
#   - no complete build at all is an error, not a silent fallback;
#   - 7.2 comes from a private apt root per Debian suite (testing, then
#     unstable), never from the machine's apt: testing's newest complete
#     build (image meta, binary, modules, base, headers, kbuild) wins over
#     a newer one in unstable; unstable's is taken only when testing has
#     none; PVDMA_GUEST_ABI_7_2 finds its ABI in whichever suite has it;
#   - selecting 6.1 after 7.2 goes back to the machine's apt.
# Prints "N passed, N failed".
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT

# The fake apt's table: "package version [suite]" lines, one per available
# build; without a suite the line is the machine's apt's, with one it is
# that Debian suite's (what a private apt root whose sources.list names the
# suite sees).
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
linux-image-7.2.9+deb14-cloud-amd64 7.2.9-1
linux-binary-7.2.9+deb14-cloud-amd64 7.2.9-1
linux-modules-7.2.9+deb14-cloud-amd64 7.2.9-1
linux-base-7.2.9+deb14-cloud-amd64 7.2.9-1
linux-headers-7.2.9+deb14-cloud-amd64 7.2.9-1
linux-headers-7.2.9+deb14-common 7.2.9-1
linux-kbuild-7.2.9+deb14 7.2.9-1
linux-image-7.2.10+deb14-cloud-amd64 7.2.10-1 testing
linux-binary-7.2.10+deb14-cloud-amd64 7.2.10-1 testing
linux-modules-7.2.10+deb14-cloud-amd64 7.2.10-1 testing
linux-base-7.2.10+deb14-cloud-amd64 7.2.10-1 testing
linux-headers-7.2.10+deb14-cloud-amd64 7.2.10-1 testing
linux-headers-7.2.10+deb14-common 7.2.10-1 testing
linux-kbuild-7.2.10+deb14 7.2.10-1 testing
linux-image-7.2.12+deb14-cloud-amd64 7.2.12-1 testing
linux-binary-7.2.12+deb14-cloud-amd64 7.2.12-1 testing
linux-modules-7.2.12+deb14-cloud-amd64 7.2.12-1 testing
linux-base-7.2.12+deb14-cloud-amd64 7.2.12-1 testing
linux-headers-7.2.12+deb14-cloud-amd64 7.2.12-1 testing
linux-headers-7.2.12+deb14-common 7.2.12-1 testing
linux-kbuild-7.2.12+deb14 7.2.12-1 testing
linux-image-7.2.13+deb14-cloud-amd64 7.2.13-1 testing
linux-binary-7.2.13+deb14-cloud-amd64 7.2.13-1 testing
linux-base-7.2.13+deb14-cloud-amd64 7.2.13-1 testing
linux-headers-7.2.13+deb14-cloud-amd64 7.2.13-1 testing
linux-headers-7.2.13+deb14-common 7.2.13-1 testing
linux-kbuild-7.2.13+deb14 7.2.13-1 testing
linux-image-7.2.13+deb14-cloud-amd64 7.2.13-1 unstable
linux-binary-7.2.13+deb14-cloud-amd64 7.2.13-1 unstable
linux-modules-7.2.13+deb14-cloud-amd64 7.2.13-1 unstable
linux-base-7.2.13+deb14-cloud-amd64 7.2.13-1 unstable
linux-headers-7.2.13+deb14-cloud-amd64 7.2.13-1 unstable
linux-headers-7.2.13+deb14-common 7.2.13-1 unstable
linux-kbuild-7.2.13+deb14 7.2.13-1 unstable
linux-image-7.2.14+deb14-cloud-amd64 7.2.14-1 unstable
linux-binary-7.2.14+deb14-cloud-amd64 7.2.14-1 unstable
linux-modules-7.2.14+deb14-cloud-amd64 7.2.14-1 unstable
linux-base-7.2.14+deb14-cloud-amd64 7.2.14-1 unstable
T
# Both fakes take apt's `-o NAME=VALUE` options; the suite is the 4th field
# of the private sources.list (`deb [signed-by=K] MIRROR SUITE main`).
cat >"$fake/apt-cache" <<'A'
#!/usr/bin/env bash
table=$(dirname "$0")/table
suite=machine
while [ "$1" = -o ]; do
    case $2 in Dir::Etc::SourceList=*) suite=$(awk '{ print $4 }' "${2#*=}") ;; esac
    shift 2
done
rows() { awk -v s="$suite" '{ t = NF > 2 ? $3 : "machine" } t == s' "$table"; }
case $1 in
pkgnames) rows | awk -v p="$2" 'index($1, p) == 1 { print $1 }' | sort -u ;;
policy)
    v=$(rows | awk -v p="$2" '$1 == p { print $2 }' | sort -V | tail -n1)
    echo "$2:"; echo "  Candidate: ${v:-(none)}" ;;
show)
    pkg=${2%%=*} ver=${2#*=}
    rows | awk -v p="$pkg" -v v="$ver" '$1 == p && $2 == v { f = 1 } END { exit !f }' &&
        printf 'Package: %s\nVersion: %s\nSHA256: 00\n' "$pkg" "$ver" ;;
*) exit 1 ;;
esac
A
# apt-get update of a private root: the suite's InRelease with its code name.
cat >"$fake/apt-get" <<'A'
#!/usr/bin/env bash
lists='' src=''
while [ "$1" = -o ]; do
    case $2 in
    Dir::State::Lists=*) lists=${2#*=} ;;
    Dir::Etc::SourceList=*) src=${2#*=} ;;
    esac
    shift 2
done
[ "$1" = -qq ] && shift
[ "$1" = update ] && [ -n "$lists" ] || exit 1
suite=$(awk '{ print $4 }' "$src")
code=$([ "$suite" = testing ] && echo forky || echo sid)
echo "Codename: $code" >"$lists/fake_dists_${suite}_InRelease"
A
chmod +x "$fake/apt-get"
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

# 7.2: testing's newest complete build is 7.2.12 (its 7.2.13 lacks
# linux-modules; the machine's 7.2.9 is never looked at), taken over
# unstable's newer 7.2.13, through testing's private apt root.
guest_kernel_select 7.2 2>"$fake/log"
check "7.2 from testing" "${GK_SUITE:-} $GK_IMAGE_PKG $GK_VER $GK_KBUILD_PKG" \
    "testing linux-image-7.2.12+deb14-cloud-amd64 7.2.12-1 linux-kbuild-7.2.12+deb14"
check "7.2 image packages" "${GK_IMAGE_DEBS:-}" \
    "linux-binary-7.2.12+deb14-cloud-amd64 linux-modules-7.2.12+deb14-cloud-amd64 linux-base-7.2.12+deb14-cloud-amd64"
check "7.2 private apt root" "$(printf '%s\n' "${GK_APT[@]}" | grep '^Dir::Etc::SourceList=')" \
    "Dir::Etc::SourceList=$PVDMA_CACHE/guest/apt-testing/etc/sources.list"
check "7.2 private sources" "$(cat "$PVDMA_CACHE/guest/apt-testing/etc/sources.list")" \
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian testing main"
check "7.2 log names the suite" "$(grep -c 'guest kernel 7.2: .*(the newest build Debian testing (forky) offers)' "$fake/log")" 1
check "7.2 release" "$GK_RELEASE" "7.2.12+deb14-cloud-amd64"

PVDMA_GUEST_ABI_7_2=7.2.13+deb14 guest_kernel_select 7.2 2>/dev/null
check "7.2 one ABI, testing first" "${GK_SUITE:-} $GK_VER" "testing 7.2.13-1"
PVDMA_GUEST_ABI_7_2=7.2.14+deb14 guest_kernel_select 7.2 2>/dev/null
check "7.2 one ABI, only in unstable" "${GK_SUITE:-} $GK_VER" "unstable 7.2.14-1"

PVDMA_GUEST_KERNEL_PIN=1 guest_kernel_select 7.2 2>/dev/null
check "pinned 7.2" "${GK_SUITE:-} $GK_VER $(cut -c1-8 <<<"${GK_MODULES_SHA256:-}") ${GK_IMAGE_SHA256:-none}" \
    "testing 7.2.12-1 12e77fcb none"

# Back to 6.1: the machine's apt again.
guest_kernel_select 6.1 2>/dev/null
check "6.1 after 7.2: machine's apt" "${GK_SUITE:-} ${#GK_APT[@]} $GK_VER" "machine 0 6.1.192-3"

# Testing loses every complete build: unstable's newest complete one,
# 7.2.13 (7.2.14 has no headers), said so in the log.
sed -i '/^linux-headers-7\.2\.1[02]+deb14-common .* testing$/d' "$fake/table"
guest_kernel_select 7.2 2>"$fake/log"
check "7.2 from unstable" "${GK_SUITE:-} $GK_IMAGE_PKG $GK_VER" \
    "unstable linux-image-7.2.13+deb14-cloud-amd64 7.2.13-1"
check "7.2 log: testing had none" \
    "$(grep -c 'Debian testing (forky) offers no complete 7.2 cloud kernel build' "$fake/log")" 1

sed -i '/common/d' "$fake/table"
if (guest_kernel_select 6.1 2>/dev/null); then rc=0; else rc=1; fi
check "no complete build is an error" "$rc" 1
if (guest_kernel_select 7.2 2>/dev/null); then rc=0; else rc=1; fi
check "no complete 7.2 build in any suite is an error" "$rc" 1

echo "guest-kernel-select: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
