#!/usr/bin/env bash
# Usage: bench/flashtools.sh
#   Brings the user-space tools of the kernel's flash caches for the
#   flashcache suite (bench/run.sh --suite flashcache) into the cache:
#   `dmsetup` (Debian's dmsetup, with libdevmapper) for dm-delay, dm-linear,
#   dm-cache and dm-writecache, and `make-bcache` (bcache-tools) for bcache.
#   Downloaded the way vm/kernel.sh downloads the kernels: `apt-get download`
#   through an apt state of its own ($UBLK_VM_CACHE/apt-HOSTCODENAME-tools, the
#   host's own release, so that the binaries run on the host's libc, which the
#   initramfs packs), extracted, never installed on the host.  The mirror is
#   the URIs: line of /etc/apt/sources.list.d/debian.sources, copied; no host
#   name is written anywhere.  Prints the extracted root (ROOT/sbin/dmsetup,
#   ROOT/usr/sbin/make-bcache, ROOT/lib/x86_64-linux-gnu/libdevmapper.so.*).
#   Fast no-op when cached.  Must run as root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../vm/lib.sh"
PKGS=(dmsetup libdevmapper1.02.1 bcache-tools)
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $CODENAME ]] || vm_die "flashtools.sh: no VERSION_CODENAME in /etc/os-release"
A="$VM_CACHE/apt-$CODENAME-tools"
ROOT_OUT="$VM_CACHE/flashtools-$CODENAME"
have() { [[ -x $ROOT_OUT/sbin/dmsetup && -x $ROOT_OUT/usr/sbin/make-bcache && -f $ROOT_OUT/packages ]]; }
if have; then echo "$ROOT_OUT"; exit 0; fi

mkdir -p "$A"
exec 9>"$A/.lock"
flock 9
if have; then echo "$ROOT_OUT"; exit 0; fi
LOG="$A/apt.log"
: > "$LOG"
fail() { echo "flashtools.sh: $*" >&2; echo "---- $LOG ----" >&2; tail -n 30 "$LOG" >&2 || true; exit 1; }
vm_ensure dpkg-deb:dpkg

SRC=/etc/apt/sources.list.d/debian.sources
[[ -f $SRC ]] || fail "no $SRC to copy the mirror URIs from"
# The first stanza's URIs (the main archive, not -security).
URIS=$(awk '/^[[:space:]]*$/{if(seen)exit} /^URIs:/{print; seen=1}' "$SRC")
[[ -n $URIS ]] || fail "no URIs: line in $SRC"
mkdir -p "$A/etc/sources.list.d" "$A/etc/preferences.d" "$A/state/lists/partial" "$A/cache/archives/partial"
printf 'Types: deb\n%s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$URIS" "$CODENAME" > "$A/etc/sources.list.d/$CODENAME.sources"
O=(-o "Dir::Etc=$A/etc" -o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$A/etc/sources.list.d"
   -o "Dir::State=$A/state" -o Dir::State::status=/dev/null -o "Dir::Cache=$A/cache"
   -o Dir::Etc::trusted=/etc/apt/trusted.gpg -o Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d)
export DEBIAN_FRONTEND=noninteractive
if [[ -z "$(ls "$A/state/lists" 2>/dev/null | grep -v -e partial -e lock)" ]]; then
    apt-get "${O[@]}" update >>"$LOG" 2>&1 || fail "apt-get update failed"
fi
tmp=$(mktemp -d "$VM_CACHE/flashtools.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
download() { ( cd "$tmp" && apt-get "${O[@]}" -o APT::Sandbox::User=root download "${PKGS[@]}" ) >>"$LOG" 2>&1; }
download || {
    # Stale lists can point at a file the mirror no longer has: refresh once.
    apt-get "${O[@]}" update >>"$LOG" 2>&1 || fail "apt-get update failed"
    download || fail "apt-get download ${PKGS[*]} failed"
}
mkdir -p "$tmp/x"
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x" || fail "dpkg-deb -x $deb failed"; done
# usr-merged or not: the tools end up where `have` looks for them.
for t in sbin/dmsetup usr/sbin/make-bcache; do
    [[ -f $tmp/x/$t ]] && continue
    f=$(find "$tmp/x" -path "*bin/${t##*/}" -type f | head -n 1)
    [[ -n $f ]] || fail "no ${t##*/} in ${PKGS[*]}"
    mkdir -p "$tmp/x/$(dirname "$t")"; cp -a "$f" "$tmp/x/$t"
done
ls "$tmp"/*.deb | xargs -n1 basename > "$tmp/x/packages"
rm -rf "$ROOT_OUT"
mv "$tmp/x" "$ROOT_OUT"
echo "$ROOT_OUT"
