#!/usr/bin/env bash
# Usage: vm/kernel.sh [7|6.12]
#   Ensures a Debian cloud kernel for the test VM is downloaded and extracted
#   into the cache, then prints the directory containing `vmlinuz`,
#   `lib/modules/<VERSION>/` and a `version` file holding <VERSION>.
#     7     (default) the newest linux-binary-7.*+deb13-cloud-amd64 of
#           trixie-backports plus its linux-modules-* package (.ko.xz). That
#           suite is read through an apt state of its own under the cache, so
#           nothing of trixie is ever installed on, or listed to, the host.
#     6.12  the newest linux-image-6.12.*-cloud-amd64-unsigned of
#           bookworm-backports (added to the host's apt sources when missing).
#   The mirror is the one in /etc/apt/sources.list.d/debian.sources: its URIs:
#   line is copied, no host name is written anywhere. Fast no-op when cached.
#   Must run as root on Debian 12 when the cache is empty.
# Env:
#   UBLK_VM_KERNEL     7 or 6.12, when no argument is given (default 7)
#   UBLK_VM_CACHE      cache root (default /var/cache/ublk-http-vm)
#   UBLK_VM_REFRESH=1  ignore the cache and fetch the newest kernel again
#   UBLK_VM_KERNEL_PKG exact package name (linux-image-... or linux-binary-...)
set -euo pipefail

FLAVOUR="${1:-${UBLK_VM_KERNEL:-7}}"
case "$FLAVOUR" in
    7|7.x) FLAVOUR=7 ;;
    6.12) ;;
    *) echo "kernel.sh: unknown kernel '$FLAVOUR' (use 7 or 6.12)" >&2; exit 2 ;;
esac
CACHE="${UBLK_VM_CACHE:-/var/cache/ublk-http-vm}"
KROOT="$CACHE/kernel"
# The 6.12 link keeps its old name, so caches of earlier checkouts stay valid.
if [[ $FLAVOUR == 6.12 ]]; then CUR="$KROOT/current"; else CUR="$KROOT/current-7"; fi

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
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    { apt-get update && apt-get install -y -q "${need_pkgs[@]}"; } >>"$LOG" 2>&1 || fail "apt-get install ${need_pkgs[*]} failed"
fi

SRC=/etc/apt/sources.list.d/debian.sources
mirror_uris() {
    [[ -f "$SRC" ]] || fail "no $SRC to copy the mirror URIs from"
    # The first stanza's URIs (the main archive, not -security).
    local uris
    uris=$(awk '/^[[:space:]]*$/{if(seen)exit} /^URIs:/{print; seen=1}' "$SRC")
    [[ -n "$uris" ]] || fail "no URIs: line in $SRC"
    echo "$uris"
}

APT=(apt-get) APTC=(apt-cache)
if [[ $FLAVOUR == 6.12 ]]; then
    BP=/etc/apt/sources.list.d/backports.sources
    added=0
    if [[ ! -f "$BP" ]] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        printf 'Types: deb\n%s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$(mirror_uris)" > "$BP"
        added=1
    fi
    find_pkgs() {
        local p
        if [[ -n "${UBLK_VM_KERNEL_PKG:-}" ]]; then p="$UBLK_VM_KERNEL_PKG"
        else
            p=$("${APTC[@]}" search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' 2>/dev/null \
                | awk '{print $1}' | grep -E '^linux-image-6\.12\.[0-9]+.*-cloud-amd64-unsigned$' | sort -V | tail -n 1)
        fi
        [[ -n "$p" ]] && "${APTC[@]}" show "$p" >/dev/null 2>&1 && echo "$p"
    }
else
    # trixie and trixie-backports through an apt state of their own.
    A="$CACHE/apt-trixie"
    mkdir -p "$A/etc/sources.list.d" "$A/etc/preferences.d" "$A/state/lists/partial" "$A/cache/archives/partial"
    printf 'Types: deb\n%s\nSuites: trixie-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$(mirror_uris)" > "$A/etc/sources.list.d/trixie.sources"
    O=(-o "Dir::Etc=$A/etc" -o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$A/etc/sources.list.d"
       -o "Dir::State=$A/state" -o Dir::State::status=/dev/null -o "Dir::Cache=$A/cache"
       -o Dir::Etc::trusted=/etc/apt/trusted.gpg -o Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d)
    APT=(apt-get "${O[@]}") APTC=(apt-cache "${O[@]}")
    added=0
    [[ -n "$(ls "$A/state/lists" 2>/dev/null | grep -v partial)" ]] || added=1
    find_pkgs() {
        local p
        if [[ -n "${UBLK_VM_KERNEL_PKG:-}" ]]; then p="$UBLK_VM_KERNEL_PKG"
        else
            p=$("${APTC[@]}" search --names-only '^linux-binary-7\..*\+deb13-cloud-amd64$' 2>/dev/null \
                | awk '{print $1}' | grep -E '^linux-binary-7\.[0-9.]+\+deb13-cloud-amd64$' | sort -V | tail -n 1)
        fi
        [[ -n "$p" ]] || return 0
        "${APTC[@]}" show "$p" >/dev/null 2>&1 || return 0
        "${APTC[@]}" show "${p/linux-binary-/linux-modules-}" >/dev/null 2>&1 || return 0
        echo "$p ${p/linux-binary-/linux-modules-}"
    }
fi

pkgs=""
[[ "${UBLK_VM_REFRESH:-0}" == 1 ]] || pkgs=$(find_pkgs || true)
updated=0
# A freshly added suite has no package list yet: update then too.
if [[ -z "$pkgs" || $added == 1 ]]; then
    "${APT[@]}" update >>"$LOG" 2>&1 || fail "apt-get update failed"
    updated=1
    pkgs=$(find_pkgs || true)
fi
if [[ -z "$pkgs" ]]; then
    [[ $FLAVOUR == 6.12 ]] && fail "no linux-image-6.12.*-cloud-amd64-unsigned package found in bookworm-backports"
    fail "no linux-binary-7.*+deb13-cloud-amd64 (with its linux-modules-*) found in trixie-backports"
fi
read -r -a PKGS <<<"$pkgs"
ver=$("${APTC[@]}" policy "${PKGS[0]}" | awk '/Candidate:/{print $2}')
dest="$KROOT/${PKGS[0]}_${ver}"
if ! valid "$dest"; then
    tmp=$(mktemp -d "$KROOT/dl.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    download() { ( cd "$tmp" && "${APT[@]}" -o APT::Sandbox::User=root download "${PKGS[@]}" ) >>"$LOG" 2>&1; }
    download || {
        # Stale lists can point at a file the mirror no longer has: refresh once.
        [[ $updated == 1 ]] && fail "apt-get download ${PKGS[*]} failed"
        "${APT[@]}" update >>"$LOG" 2>&1 || fail "apt-get update failed"
        download || fail "apt-get download ${PKGS[*]} failed"
    }
    mkdir -p "$tmp/x" "$tmp/out/lib/modules"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x" || fail "dpkg-deb -x $deb failed"; done
    if [[ $FLAVOUR == 6.12 ]]; then
        kver=$(ls "$tmp/x/lib/modules" | head -n 1)
        [[ -n "$kver" && -f "$tmp/x/boot/vmlinuz-$kver" ]] || fail "unexpected layout in ${PKGS[0]}"
        mv "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
        [[ -f "$tmp/x/boot/config-$kver" ]] && mv "$tmp/x/boot/config-$kver" "$tmp/out/config"
        [[ -f "$tmp/x/boot/System.map-$kver" ]] && mv "$tmp/x/boot/System.map-$kver" "$tmp/out/System.map"
        mv "$tmp/x/lib/modules/$kver" "$tmp/out/lib/modules/$kver"
    else
        # linux-binary-VER: usr/lib/modules/VER/vmlinuz; linux-modules-VER: usr/lib/modules/VER/kernel/**.ko.xz
        kver=$(ls "$tmp/x/usr/lib/modules" | head -n 1)
        [[ -n "$kver" && -f "$tmp/x/usr/lib/modules/$kver/vmlinuz" && -d "$tmp/x/usr/lib/modules/$kver/kernel" ]] \
            || fail "unexpected layout in ${PKGS[*]}"
        mv "$tmp/x/usr/lib/modules/$kver/vmlinuz" "$tmp/out/vmlinuz"
        mv "$tmp/x/usr/lib/modules/$kver" "$tmp/out/lib/modules/$kver"
    fi
    echo "$kver" > "$tmp/out/version"
    echo "${PKGS[*]} $ver" > "$tmp/out/package"
    rm -rf "$dest"
    mv "$tmp/out" "$dest"
    rm -rf "$tmp"
    trap - EXIT
fi
ln -sfn "$(basename "$dest")" "$CUR.tmp" && mv -T "$CUR.tmp" "$CUR"
readlink -f "$CUR"
