#!/usr/bin/env bash
# Usage: bench/kublk.sh
#   Builds `kublk`, the ublk server of the kernel's selftests
#   (tools/testing/selftests/ublk/ of Debian's newest linux-source-7.x of
#   trixie-backports), as a static binary that runs in the bench VM, and
#   prints its path.  Nothing of it is copied into the repo and nothing of
#   trixie is installed on the host: the packages are read through an apt state
#   of their own, $UBLK_VM_CACHE/apt-trixie-full (suites trixie and
#   trixie-backports; the mirror is the URIs: line of
#   /etc/apt/sources.list.d/debian.sources, copied as vm/kernel.sh does),
#   downloaded with `apt-get download` and unpacked under
#   $UBLK_VM_CACHE/kublk/:
#     linux-source-7.x (trixie-backports)   only tools/testing/selftests/ublk/
#     liburing-dev (trixie, 2.9)             headers and the static liburing.a
#     linux-libc-dev (trixie-backports)      the 7.x UAPI headers (ublk_cmd.h,
#                                            io_uring.h, ...)
#   compiled with the host's gcc and static glibc (Debian 12).  A fast no-op
#   when the binary for that source version is cached.
# Env: UBLK_VM_CACHE (default /var/cache/ublk-http-vm), KUBLK_REFRESH=1
#   (update the package lists and rebuild).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/vm/lib.sh"
KC="$VM_CACHE/kublk"
A="$VM_CACHE/apt-trixie-full"
log() { echo "[kublk] $*" >&2; }
fail() { echo "kublk.sh: $*" >&2; [[ -f $KC/build.log ]] && tail -n 40 "$KC/build.log" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || fail "must run as root (apt state under $VM_CACHE)"
mkdir -p "$KC"
exec 9>"$KC/.lock"
flock 9

if [[ "${KUBLK_REFRESH:-0}" != 1 && -x $KC/current/kublk ]]; then
    readlink -f "$KC/current/kublk"; exit 0
fi
vm_ensure gcc:gcc make:make xz:xz-utils dpkg-deb:dpkg /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev

SRC=/etc/apt/sources.list.d/debian.sources
[[ -f $SRC ]] || fail "no $SRC to copy the mirror URIs from"
URIS=$(awk '/^[[:space:]]*$/{if(seen)exit} /^URIs:/{print; seen=1}' "$SRC")
[[ -n $URIS ]] || fail "no URIs: line in $SRC"
mkdir -p "$A/etc/sources.list.d" "$A/etc/preferences.d" "$A/state/lists/partial" "$A/cache/archives/partial"
printf 'Types: deb\n%s\nSuites: trixie trixie-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$URIS" > "$A/etc/sources.list.d/trixie.sources"
O=(-o "Dir::Etc=$A/etc" -o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$A/etc/sources.list.d"
   -o "Dir::State=$A/state" -o Dir::State::status=/dev/null -o "Dir::Cache=$A/cache"
   -o Dir::Etc::trusted=/etc/apt/trusted.gpg -o Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d
   -o APT::Sandbox::User=root)
if [[ "${KUBLK_REFRESH:-0}" == 1 || -z "$(ls "$A/state/lists" 2>/dev/null | grep -v -e partial -e lock)" ]]; then
    log "apt-get update (trixie, trixie-backports) in $A"
    apt-get "${O[@]}" update >"$KC/apt.log" 2>&1 || { tail -n 20 "$KC/apt.log" >&2; fail "apt-get update failed"; }
fi
# candidate PKG SUITE-REGEX: the newest version of PKG from a suite matching SUITE-REGEX
candidate() {
    apt-cache "${O[@]}" madison "$1" 2>/dev/null | awk -F'|' -v s="$2" '$3 ~ s { gsub(/ /, "", $2); print $2 }' | sort -V | tail -n 1
}
LSRC=$(apt-cache "${O[@]}" search --names-only '^linux-source-7\.[0-9]+$' 2>/dev/null | awk '{print $1}' | sort -V | tail -n 1)
[[ -n $LSRC ]] || fail "no linux-source-7.x in trixie-backports"
LSRC_V=$(candidate "$LSRC" 'trixie-backports')
URING_V=$(candidate liburing-dev ' trixie/')
LIBC_V=$(candidate linux-libc-dev 'trixie-backports')
[[ -n $LSRC_V && -n $URING_V && -n $LIBC_V ]] || fail "versions not found: $LSRC=$LSRC_V liburing-dev=$URING_V linux-libc-dev=$LIBC_V"
KEY="${LSRC}_${LSRC_V}+liburing_${URING_V}"
OUT="$KC/$KEY"
if [[ -x $OUT/kublk ]]; then
    ln -sfn "$KEY" "$KC/current"; readlink -f "$OUT/kublk"; exit 0
fi
DL="$KC/debs"
mkdir -p "$DL"
for p in "$LSRC=$LSRC_V" "liburing-dev=$URING_V" "linux-libc-dev=$LIBC_V"; do
    f="$DL/${p%%=*}_$(sed 's/:/%3a/' <<<"${p#*=}")_"
    ls "$f"*.deb >/dev/null 2>&1 && continue
    log "downloading $p"
    ( cd "$DL" && apt-get "${O[@]}" download "$p" ) >>"$KC/apt.log" 2>&1 || { tail -n 20 "$KC/apt.log" >&2; fail "apt-get download $p failed"; }
done
deb() { ls "$DL/$1_$(sed 's/:/%3a/' <<<"$2")_"*.deb | head -n 1; }
W=$(mktemp -d "$KC/build.XXXXXX")
trap 'rm -rf "$W"' EXIT
log "unpacking liburing-dev $URING_V, linux-libc-dev $LIBC_V"
dpkg-deb -x "$(deb liburing-dev "$URING_V")" "$W/uring"
dpkg-deb -x "$(deb linux-libc-dev "$LIBC_V")" "$W/libc"
TOP=${LSRC}
if [[ ! -f $KC/src/${LSRC}_$LSRC_V/.done ]]; then
    dpkg-deb -x "$(deb "$LSRC" "$LSRC_V")" "$W/lsrc"
    TARBALL=$(ls "$W"/lsrc/usr/src/linux-source-*.tar.* | head -n 1)
    [[ -f $TARBALL ]] || fail "no tarball in $LSRC"
    TOP=$(basename "$TARBALL"); TOP=${TOP%.tar.*}
fi
# Only that directory (and ublk_cmd.h, for reference) is kept, under the cache.
XS="$KC/src/${LSRC}_$LSRC_V"
if [[ ! -f $XS/.done ]]; then
    log "extracting tools/testing/selftests/ublk from $(basename "$TARBALL")"
    rm -rf "$XS"; mkdir -p "$XS"
    tar -C "$XS" -xf "$TARBALL" --wildcards "$TOP/tools/testing/selftests/ublk/*" "$TOP/include/uapi/linux/ublk_cmd.h" \
        || fail "cannot extract the selftests from $TARBALL"
    touch "$XS/.done"
fi
S="$XS/$TOP/tools/testing/selftests/ublk"
mkdir -p "$OUT.tmp"
# The Makefile's flags (-O3, -Wall, -I usr/include; kselftest's lib.mk adds
# -D_GNU_SOURCE), without -Werror (another
# compiler than the kernel's), statically linked against trixie's liburing.a.
mapfile -t CSRC < <(ls "$S"/*.c | grep -v metadata_size.c)
log "compiling kublk (${#CSRC[@]} files)"
gcc -O3 -Wall -D_GNU_SOURCE -static -o "$OUT.tmp/kublk" \
    -I "$W/uring/usr/include" -I "$W/libc/usr/include" -I "$W/libc/usr/include/x86_64-linux-gnu" \
    "${CSRC[@]}" "$(find "$W/uring" -name liburing.a | head -n 1)" -lpthread -lm >"$KC/build.log" 2>&1 \
    || fail "gcc failed (log $KC/build.log)"
cp "$S/kublk.c" "$S/file_backed.c" "$OUT.tmp/"    # for reading its options, not part of the repo
printf '%s %s\nliburing-dev %s\nlinux-libc-dev %s\n' "$LSRC" "$LSRC_V" "$URING_V" "$LIBC_V" > "$OUT.tmp/versions"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
ln -sfn "$KEY" "$KC/current"
log "built $OUT/kublk ($(cat "$OUT/versions" | paste -sd';'))"
readlink -f "$OUT/kublk"
