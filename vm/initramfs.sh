#!/usr/bin/env bash
# Usage: vm/initramfs.sh OUT.cpio[.gz] [--bin SRC[:DST]]... [--file SRC:DST]...
#                        [--module NAME]... [--boot-modules "NAME..."]
#   Builds the base initramfs for the test VM (see vm/run.sh and vm/README.md):
#   busybox-static (applets in /bin), bash, fio, nginx, curl, jq, e2fsprogs
#   (mke2fs/mkfs.ext4/e2fsck/...), the executables of coreutils diffutils grep
#   sed findutils procps psmisc util-linux mount mawk (in /usr/{s,}bin, ahead
#   of busybox in $PATH), every library ldd lists, the kernel modules ublk_drv
#   loop nbd brd virtio_blk (+deps, decompressed) and vm/guest/ scripts.
#   --bin SRC[:DST]  add an executable plus its ldd libraries (libraries keep
#                    their host paths, e.g. /opt/swift/usr/lib/swift/linux/...).
#                    DST defaults to /usr/local/bin/<basename SRC>.
#   --file SRC:DST   add a file or directory (recursively) at guest path DST.
#   --module NAME    add another kernel module (and its dependencies).
#   --boot-modules   modules /init loads at boot (default "ublk_drv").
#   OUT ending in .gz is gzip-compressed, otherwise a plain newc cpio (boots
#   faster under TCG).  Also writes OUT.manifest (guest paths) and OUT.kver.
#   Example: vm/initramfs.sh /tmp/base.cpio --bin .build/release/ublk-http
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
OUT="$1"; shift
[[ "$OUT" != -* ]] || usage
BINS=() FILES=() MODULES=(ublk_drv loop nbd brd virtio_blk) BOOT_MODULES="ublk_drv"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BINS+=("$2"); shift 2 ;;
        --file) FILES+=("$2"); shift 2 ;;
        --module) MODULES+=("$2"); shift 2 ;;
        --boot-modules) BOOT_MODULES="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) vm_die "unknown argument: $1" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || vm_die "must run as root (mknod, apt-get)"

static_busybox() { [[ -x /usr/bin/busybox ]] && ! ldd /usr/bin/busybox >/dev/null 2>&1; }
static_busybox || vm_ensure /nonexistent/force:busybox-static
vm_ensure fio:fio nginx:nginx-light curl:curl mke2fs:e2fsprogs e2fsck:e2fsprogs \
    losetup:mount taskset:util-linux blkdiscard:util-linux lsblk:util-linux \
    cpio:cpio xz:xz-utils gzip:gzip bash:bash ldconfig:libc-bin jq:jq pgrep:procps \
    cmp:diffutils killall:psmisc mawk:mawk
static_busybox || vm_die "/usr/bin/busybox is not the static busybox"

KDIR="$("$VM_DIR/kernel.sh")"
KVER="$(cat "$KDIR/version")"
KMOD="$KDIR/lib/modules/$KVER"

STAGE="$(mktemp -d /tmp/ublk-vm-initramfs.XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT
VM_STAGE="$STAGE"
add_file() { vm_stage_file "$@"; }
add_bin() { vm_stage_bin "$@"; }

# ---- skeleton --------------------------------------------------------------
for d in bin usr/bin usr/sbin usr/local/bin usr/local/sbin lib etc root proc sys dev run tmp mnt \
         var/log/nginx var/lib/nginx var/tmp test etc/ublk-vm etc/nginx; do
    mkdir -p "$STAGE/$d"
done
chmod 1777 "$STAGE/tmp" "$STAGE/var/tmp"
vm_stage_link bin /sbin
mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$STAGE/dev/null" c 1 3 2>/dev/null || true

# busybox: every applet as a symlink in /bin (a real directory, NOT usr-merged,
# so the real tools in /usr/{s,}bin come first in $PATH for bash).
cp /usr/bin/busybox "$STAGE/bin/busybox"
for a in $(/usr/bin/busybox --list); do
    [[ "$a" == busybox ]] || ln -sf busybox "$STAGE/bin/$a"
done

# ---- real tools --------------------------------------------------------------
add_bin /usr/bin/bash /usr/bin/bash
vm_stage_link /usr/bin/bash /bin/bash
add_bin "$(command -v fio)" /usr/bin/fio
add_bin "$(command -v nginx)" /usr/sbin/nginx
add_bin "$(command -v curl)" /usr/bin/curl
for t in mke2fs e2fsck tune2fs dumpe2fs resize2fs debugfs; do
    p="$(command -v $t || true)"; [[ -n "$p" ]] && add_bin "$p" "/usr/sbin/$t"
done
vm_stage_link mke2fs /usr/sbin/mkfs.ext4
vm_stage_link mke2fs /usr/sbin/mkfs.ext2
vm_stage_link e2fsck /usr/sbin/fsck.ext4
# Whole packages' executables, so bash scripts get GNU/util-linux behaviour
# (busybox's `head -c 1M` fails, for one).  /bin and /sbin map to /usr/bin
# and /usr/sbin, which come before busybox's /bin in $PATH.
add_pkg_bins() { # PKG...
    local pkg f dst
    for pkg in "$@"; do
        while read -r f; do
            [[ "$f" =~ ^(/usr)?/s?bin/[^/]+$ && -f "$f" && -x "$f" ]] || continue
            dst="/usr${f#/usr}"
            add_bin "$f" "$dst"
        done < <(dpkg -L "$pkg")
    done
}
add_pkg_bins coreutils diffutils grep sed findutils procps psmisc util-linux mount mawk jq
vm_stage_link mawk /usr/bin/awk
# ldconfig (static) lets /init refresh ld.so.cache for libraries run.sh --bin adds.
add_file "$(command -v ldconfig)" /usr/sbin/ldconfig

# ---- config ----------------------------------------------------------------------
cat > "$STAGE/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$STAGE/etc/group" <<'G'
root:x:0:
daemon:x:1:
tty:x:5:
disk:x:6:
www-data:x:33:
nogroup:x:65534:
G
cat > "$STAGE/etc/nsswitch.conf" <<'N'
passwd: files
group: files
shadow: files
hosts: files
networks: files
protocols: files
services: files
N
printf '127.0.0.1\tlocalhost ublkvm\n::1\tlocalhost ip6-localhost\n' > "$STAGE/etc/hosts"
echo ublkvm > "$STAGE/etc/hostname"
vm_stage_link /proc/self/mounts /etc/mtab
[[ -f /etc/mke2fs.conf ]] && add_file /etc/mke2fs.conf /etc/mke2fs.conf
[[ -f /usr/share/zoneinfo/Etc/UTC ]] && add_file /usr/share/zoneinfo/Etc/UTC /etc/localtime
add_file /etc/nginx/mime.types /etc/nginx/mime.types
add_file "$VM_DIR/guest/nginx.conf.in" /etc/nginx/ublk-test.conf.in
add_file "$VM_DIR/guest/init" /init
add_file "$VM_DIR/guest/kmod-load" /usr/local/sbin/kmod-load
add_file "$VM_DIR/guest/nginx-start" /usr/local/bin/nginx-start
add_file "$VM_DIR/guest/nginx-stop" /usr/local/bin/nginx-stop
chmod 0755 "$STAGE/init" "$STAGE"/usr/local/sbin/* "$STAGE"/usr/local/bin/*
echo "$KVER" > "$STAGE/etc/ublk-vm/kernel-version"
echo "$BOOT_MODULES" > "$STAGE/etc/ublk-vm/boot-modules"

# ---- kernel modules --------------------------------------------------------------
GMOD="$STAGE/lib/modules/$KVER"
mkdir -p "$GMOD"
cp "$KMOD/modules.builtin" "$KMOD/modules.order" "$GMOD/" 2>/dev/null || true
declare -A MOD_DONE=()
: > "$GMOD/modules.dep"
mod_file() { # NAME -> path of NAME.ko* under $KMOD (dash/underscore insensitive)
    local n="$1" alt
    alt="$(tr _ - <<<"$n")"
    find "$KMOD/kernel" \( -name "$n.ko" -o -name "$n.ko.xz" -o -name "$n.ko.zst" -o -name "$alt.ko" -o -name "$alt.ko.xz" -o -name "$alt.ko.zst" \) -print -quit
}
is_builtin() { [[ -f "$KMOD/modules.builtin" ]] && grep -qE "/($1|$(tr _ - <<<"$1"))\.ko$" "$KMOD/modules.builtin"; }
add_module() { # NAME
    local n f rel deps d drel=""
    n="$(tr - _ <<<"$1")"
    [[ -n "${MOD_DONE[$n]:-}" ]] && return 0
    MOD_DONE[$n]=1
    if is_builtin "$n"; then return 0; fi
    f="$(mod_file "$n")"
    [[ -n "$f" ]] || vm_die "kernel module $n not found in $KMOD"
    rel="${f#"$KMOD"/}"; rel="${rel%.xz}"; rel="${rel%.zst}"
    mkdir -p "$(dirname "$GMOD/$rel")"
    case "$f" in
        *.xz) xz -dc "$f" > "$GMOD/$rel" ;;
        *.zst) zstd -qdc "$f" > "$GMOD/$rel" ;;
        *) cp "$f" "$GMOD/$rel" ;;
    esac
    deps="$(tr '\0' '\n' < "$GMOD/$rel" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')"
    for d in $deps; do
        add_module "$d"
        is_builtin "$(tr - _ <<<"$d")" && continue
        f="$(mod_file "$d")"; f="${f#"$KMOD"/}"; f="${f%.xz}"; f="${f%.zst}"
        drel+=" $f"
    done
    echo "$rel:$drel" >> "$GMOD/modules.dep"
}
for m in "${MODULES[@]}"; do add_module "$m"; done

# ---- extra binaries and files -------------------------------------------------------
for spec in "${BINS[@]}"; do
    add_bin "$(vm_bin_src "$spec")" "$(vm_bin_dst "$spec")"
done
for spec in "${FILES[@]}"; do
    [[ "$spec" == *:/* ]] || vm_die "--file wants SRC:/ABS/DST, got $spec"
    src="${spec%%:/*}"; dst="/${spec#*:/}"
    [[ -e "$src" ]] || vm_die "no such file: $src"
    add_file "$src" "$dst"
done

# ---- ld.so.cache (covers libraries only reachable via RUNPATH, e.g. ceph) ----------------------
{
    printf '%s\n' "${!VM_LIBDIRS[@]}" | sort
    echo "include /etc/ld.so.conf.d/*.conf"
} > "$STAGE/etc/ld.so.conf"
mkdir -p "$STAGE/etc/ld.so.conf.d"
ldconfig -r "$STAGE"

# ---- pack ---------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
tmp="$OUT.tmp.$$"
(
    cd "$STAGE"
    find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet
) | if [[ "$OUT" == *.gz ]]; then gzip -1; else cat; fi > "$tmp"
( cd "$STAGE" && find . -mindepth 1 | sed 's/^\.//' | LC_ALL=C sort ) > "$OUT.manifest"
echo "$KVER" > "$OUT.kver"
mv -f "$tmp" "$OUT"
vm_log "initramfs $OUT ($(du -h "$OUT" | cut -f1), kernel $KVER, $(find "$STAGE" | wc -l) entries)"
