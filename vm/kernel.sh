#!/usr/bin/env bash
# Usage: vm/kernel.sh
#   Ensures the Debian bookworm-backports 6.12 cloud kernel
#   (linux-image-6.12.*-cloud-amd64-unsigned) is downloaded and extracted into
#   the cache, then prints the directory containing `vmlinuz` and
#   `lib/modules/<VERSION>/` (plus a `version` file holding <VERSION>).
#   Fast no-op when already cached.  Must run as root on Debian 12 when the
#   cache is empty (it adds the backports suite to apt and downloads the .deb).
# Env:
#   UBLK_VM_CACHE      cache root (default /var/cache/ublk-http-vm)
#   UBLK_VM_REFRESH=1  ignore the cache and fetch the newest kernel again
#   UBLK_VM_KERNEL_PKG exact package name to use instead of the newest one
set -euo pipefail

CACHE="${UBLK_VM_CACHE:-/var/cache/ublk-http-vm}"
KROOT="$CACHE/kernel"
CUR="$KROOT/current"

valid() {
    local d="$1"
    [[ -f "$d/vmlinuz" && -f "$d/version" ]] || return 1
    [[ -d "$d/lib/modules/$(cat "$d/version")/kernel" ]]
}

if [[ "${UBLK_VM_REFRESH:-0}" != 1 && -z "${UBLK_VM_KERNEL_PKG:-}" ]] && valid "$CUR"; then
    readlink -f "$CUR"
    exit 0
fi

mkdir -p "$KROOT"
# Serialise concurrent first runs; re-check the cache once we hold the lock.
exec 9>"$KROOT/.lock"
flock 9
if [[ "${UBLK_VM_REFRESH:-0}" != 1 && -z "${UBLK_VM_KERNEL_PKG:-}" ]] && valid "$CUR"; then
    readlink -f "$CUR"
    exit 0
fi
LOG="$KROOT/apt.log"
: > "$LOG"
fail() { echo "kernel.sh: $*" >&2; echo "---- $LOG ----" >&2; tail -n 50 "$LOG" >&2 || true; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# Wait for any concurrent apt/dpkg run to finish.
while pgrep -x apt-get >/dev/null || pgrep -x dpkg >/dev/null; do sleep 3; done

need_pkgs=()
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg)

BP=/etc/apt/sources.list.d/backports.sources
updated=0 added_bp=0
if [[ ! -f "$BP" ]] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    SRC=/etc/apt/sources.list.d/debian.sources
    [[ -f "$SRC" ]] || fail "no $SRC to copy the mirror URIs from"
    # The first stanza's URIs (the main archive, not -security).
    uris=$(awk '/^[[:space:]]*$/{if(seen)exit} /^URIs:/{print; seen=1}' "$SRC")
    [[ -n "$uris" ]] || fail "no URIs: line in $SRC"
    {
        echo "Types: deb"
        echo "$uris"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    } > "$BP"
    added_bp=1
fi

find_pkg() {
    if [[ -n "${UBLK_VM_KERNEL_PKG:-}" ]]; then
        apt-cache show "$UBLK_VM_KERNEL_PKG" >/dev/null 2>&1 && echo "$UBLK_VM_KERNEL_PKG"
        return 0
    fi
    apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' 2>/dev/null \
        | awk '{print $1}' | grep -E '^linux-image-6\.12\.[0-9]+.*-cloud-amd64-unsigned$' | sort -V | tail -n 1
}

pkg=""
[[ "${UBLK_VM_REFRESH:-0}" == 1 ]] || pkg=$(find_pkg || true)
# A freshly added backports suite has no package list yet: update then too.
if [[ -z "$pkg" || ${#need_pkgs[@]} -gt 0 || $added_bp == 1 ]]; then
    apt-get update >>"$LOG" 2>&1 || fail "apt-get update failed"
    updated=1
    pkg=$(find_pkg || true)
fi
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    apt-get install -y -q "${need_pkgs[@]}" >>"$LOG" 2>&1 || fail "apt-get install ${need_pkgs[*]} failed"
fi
[[ -n "$pkg" ]] || fail "no linux-image-6.12.*-cloud-amd64-unsigned package found in bookworm-backports"

ver=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2}')
dest="$KROOT/${pkg}_${ver}"
if ! valid "$dest"; then
    tmp=$(mktemp -d "$KROOT/dl.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    ( cd "$tmp" && apt-get -o APT::Sandbox::User=root download "$pkg" ) >>"$LOG" 2>&1 || {
        # Stale lists can point at a file the mirror no longer has: refresh once.
        [[ $updated == 1 ]] && fail "apt-get download $pkg failed"
        apt-get update >>"$LOG" 2>&1 || fail "apt-get update failed"
        ( cd "$tmp" && apt-get -o APT::Sandbox::User=root download "$pkg" ) >>"$LOG" 2>&1 || fail "apt-get download $pkg failed"
    }
    deb=$(ls "$tmp"/*.deb | head -n 1)
    mkdir -p "$tmp/x"
    dpkg-deb -x "$deb" "$tmp/x" || fail "dpkg-deb -x $deb failed"
    kver=$(ls "$tmp/x/lib/modules" | head -n 1)
    [[ -n "$kver" && -f "$tmp/x/boot/vmlinuz-$kver" ]] || fail "unexpected layout in $deb"
    mkdir -p "$tmp/out/lib/modules"
    mv "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
    [[ -f "$tmp/x/boot/config-$kver" ]] && mv "$tmp/x/boot/config-$kver" "$tmp/out/config"
    [[ -f "$tmp/x/boot/System.map-$kver" ]] && mv "$tmp/x/boot/System.map-$kver" "$tmp/out/System.map"
    mv "$tmp/x/lib/modules/$kver" "$tmp/out/lib/modules/$kver"
    echo "$kver" > "$tmp/out/version"
    echo "$pkg $ver" > "$tmp/out/package"
    rm -rf "$dest"
    mv "$tmp/out" "$dest"
    rm -rf "$tmp"
    trap - EXIT
fi
ln -sfn "$(basename "$dest")" "$CUR.tmp" && mv -T "$CUR.tmp" "$CUR"
readlink -f "$CUR"
