#!/usr/bin/env bash
# Usage: vm/rootfs.sh
#   Ensures the root disk image of the systemd test guest (vm/run-systemd.sh)
#   is built and cached, then prints its path. The image is a sparse raw ext4
#   file system (label ublkroot, 2 GiB apparent size by default) made with
#   `mkfs.ext4 -d` from a Debian bookworm rootfs:
#     debootstrap --variant=minbase --include=<PACKAGES below>
#   from the mirror of /etc/apt/sources.list.d/debian.sources (its URIs: line,
#   copied as vm/kernel.sh does; no host name is written into the repo), plus
#   the modules of the test kernel (vm/kernel.sh) under /lib/modules/VERSION
#   (.ko.xz, with depmod's modules.dep), so `modprobe ublk_drv|brd|loop|dm-*`
#   work in the guest. Masked: serial/VT gettys, apt/dpkg/fstrim/e2scrub
#   timers; nginx.service is disabled (start nginx yourself). No network.
#   Beside the image: IMAGE.manifest (its paths, for run-systemd.sh) and
#   IMAGE.kver. Cache key: sha256 of the suite, the package list, the
#   kernel version and ROOTFS_VERSION below (bump it when you change how the
#   image is built), so changing any of them builds a new image. Fast no-op
#   when cached; images unused for 14 days are deleted. Builds take ~3-5 min (debootstrap); the .debs are kept in
#   $UBLK_VM_CACHE/rootfs/debs for rebuilds.
# Env:
#   UBLK_VM_KERNEL          7 (default) or 6.12: whose modules go in
#   UBLK_VM_CACHE           cache root (default /var/cache/ublk-http-vm)
#   UBLK_VM_ROOTFS_EXTRA    extra Debian packages to include (space separated)
#   UBLK_VM_ROOTFS_SIZE     apparent image size for mkfs (default 2G)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOTFS_VERSION=1
SUITE=bookworm
# The last line: the ublk-http package's Depends (the guest has no network to
# fetch them; tests/vm-systemd.sh adds any the package gains).
PACKAGES=(systemd systemd-sysv udev dbus kmod e2fsprogs util-linux procps psmisc
          nginx-light curl fio jq diffutils iproute2
          libc6 libcurl4 libgcc-s1 libssl3 libstdc++6 liburing2)
# shellcheck disable=SC2206
EXTRA=(${UBLK_VM_ROOTFS_EXTRA:-})
SIZE="${UBLK_VM_ROOTFS_SIZE:-2G}"

[[ $# -eq 0 ]] || { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

KDIR="$("$VM_DIR/kernel.sh")"
KVER="$(cat "$KDIR/version")"
ALL=$(printf '%s\n' "${PACKAGES[@]}" "${EXTRA[@]}" | sort -u | tr '\n' ' ')
KEY=$(printf 'v%s\n%s\n%s\n%s\n' "$ROOTFS_VERSION" "$SUITE" "$ALL" "$KVER" | sha256sum | cut -c1-16)
DIR="$VM_CACHE/rootfs"
IMG="$DIR/$SUITE-$KEY.img"

valid() { [[ -f "$IMG" && -f "$IMG.manifest" && -f "$IMG.kver" ]]; }
if valid; then echo "$IMG"; exit 0; fi

[[ $(id -u) -eq 0 ]] || vm_die "must run as root (debootstrap)"
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
if valid; then echo "$IMG"; exit 0; fi

vm_ensure debootstrap:debootstrap mkfs.ext4:e2fsprogs
SRC=/etc/apt/sources.list.d/debian.sources
[[ -f "$SRC" ]] || vm_die "no $SRC to copy the mirror URIs from"
# The first stanza's URIs (the main archive, not -security); its first URI.
MIRROR=$(awk '/^[[:space:]]*$/{if(seen)exit} /^URIs:/{print $2; seen=1}' "$SRC")
[[ -n "$MIRROR" ]] || vm_die "no URIs: line in $SRC"

T0=$(date +%s)
BUILD="$(mktemp -d "$DIR/build.XXXXXX")"
R="$BUILD/root"
LOG="$DIR/build.log"
: > "$LOG"
cleanup() {
    # debootstrap may leave proc/sys mounted in the chroot on failure.
    local m
    for m in $(awk -v r="$R" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$BUILD"
}
trap cleanup EXIT
mkdir -p "$DIR/debs"
vm_log "building the $SUITE rootfs $IMG (log: $LOG)"
vm_log "  packages: $ALL"
incl=$(tr ' ' ',' <<<"${ALL% }")
debootstrap --variant=minbase --include="$incl" --cache-dir="$DIR/debs" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$R" "$MIRROR" >>"$LOG" 2>&1 \
    || { tail -n 40 "$LOG" >&2; vm_die "debootstrap failed (log: $LOG)"; }
T1=$(date +%s)
vm_log "  debootstrap done in $((T1 - T0)) s"

# ---- configuration ---------------------------------------------------------------------
echo ublkvm > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tublkvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
printf '# <fs> <mountpoint> <type> <options> <dump> <pass>\nLABEL=ublkroot / ext4 defaults 0 0\n' > "$R/etc/fstab"
# A fixed machine id: an empty one would make the first boot of every run a
# systemd "first boot" (preset-all, firstboot units).
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$R/etc/machine-id"; echo >> "$R/etc/machine-id"
ln -sfn /usr/share/zoneinfo/Etc/UTC "$R/etc/localtime"
echo Etc/UTC > "$R/etc/timezone"
ln -sfn /usr/lib/systemd/system/multi-user.target "$R/etc/systemd/system/default.target"
# No gettys: the console belongs to the test (no login is needed).  No
# periodic jobs that would start at random in a test.
for u in serial-getty@ttyS0.service getty@tty1.service console-getty.service \
         apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer fstrim.timer e2scrub_all.timer \
         e2scrub_reap.service systemd-tmpfiles-clean.timer; do
    ln -sfn /dev/null "$R/etc/systemd/system/$u"
done
# nginx: installed (its binary and config), not started at boot.
rm -f "$R/etc/systemd/system/multi-user.target.wants/nginx.service"
# Logs: persistent journal (journalctl -b -1 works after a guest reboot), small.
mkdir -p "$R/etc/systemd/journald.conf.d" "$R/var/log/journal"
printf '[Journal]\nSystemMaxUse=64M\n' > "$R/etc/systemd/journald.conf.d/ublk-vm.conf"
# apt inside the guest has no network: keep the package lists empty and quiet.
rm -rf "$R/var/cache/apt/archives/"*.deb "$R/var/lib/apt/lists/"* 2>/dev/null || true
mkdir -p "$R/var/lib/apt/lists/partial"

# ---- kernel modules ------------------------------------------------------------------------
mkdir -p "$R/usr/lib/modules"
cp -a "$KDIR/lib/modules/$KVER" "$R/usr/lib/modules/$KVER"
chroot "$R" /sbin/depmod -a "$KVER" >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; vm_die "depmod failed"; }
[[ -s "$R/usr/lib/modules/$KVER/modules.dep" ]] || vm_die "depmod wrote no modules.dep"
grep -q 'ublk_drv.ko' "$R/usr/lib/modules/$KVER/modules.dep" || vm_die "ublk_drv missing from modules.dep"

# ---- image -------------------------------------------------------------------------------------------
( cd "$R" && find . -mindepth 1 | sed 's/^\.//' | LC_ALL=C sort ) > "$BUILD/manifest"
truncate -s "$SIZE" "$BUILD/img"
mkfs.ext4 -q -F -L ublkroot -E root_owner=0:0 -d "$R" "$BUILD/img" >>"$LOG" 2>&1 \
    || { tail -n 20 "$LOG" >&2; vm_die "mkfs.ext4 -d failed"; }
e2fsck -fn "$BUILD/img" >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; vm_die "e2fsck of the new image failed"; }
echo "$KVER" > "$IMG.kver.tmp"
mv "$BUILD/manifest" "$IMG.manifest"
mv "$IMG.kver.tmp" "$IMG.kver"
mv "$BUILD/img" "$IMG"
# Images no run has used for 14 days (run-systemd.sh touches IMAGE.kver).
find "$DIR" -maxdepth 1 -name '*.img.kver' -mtime +14 -print 2>/dev/null | while read -r k; do
    vm_log "removing unused image ${k%.kver}"; rm -f "${k%.kver}" "${k%.kver}.manifest" "$k"
done
T2=$(date +%s)
vm_log "rootfs $IMG ($(du -h "$IMG" | cut -f1) used of $SIZE, kernel $KVER) built in $((T2 - T0)) s"
echo "$IMG"
