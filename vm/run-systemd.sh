#!/usr/bin/env bash
# Usage: vm/run-systemd.sh [--timeout SECONDS] [--mem MB] [--smp N]
#                          [--file SRC:/DST]... [--deb FILE]... [--env NAME=VALUE]...
#                          [--disk-size SIZE] [--append KERNEL-ARGS]
#                          [--allow-kernel-issues] [--log FILE] [--keep-disk FILE]
#                          SCRIPT [ARGS...]
#   Boots the systemd guest: the Debian rootfs of vm/rootfs.sh (systemd as
#   PID 1, udev, dbus) on the kernel of vm/kernel.sh, root on an emulated NVMe
#   disk (the driver is built in: no initramfs). Each run boots a fresh copy
#   of the cached image (cp --reflink=auto --sparse=always, under
#   $UBLK_VM_CACHE/runs), into which it writes with debugfs (no mounts):
#     /test/script   SCRIPT; /test/main runs it with ARGS and the --env exports
#     /test/debs/    the --deb packages, installed with dpkg -i in the first boot
#     DST            every --file SRC:/DST (a file or a directory tree, root-owned)
#   plus the runner (vm/systemd-guest/): ublk-test.service (enabled, After=
#   multi-user.target) runs /test/main in EVERY boot, with UBLK_TEST_BOOT=<n>
#   (1, 2, ...) and UBLK_TEST_STATE=/var/lib/ublk-test (persistent). The test
#   may `systemctl reboot`: qemu runs without -no-reboot, so the guest comes
#   back on the same disk and the test runs again with the next UBLK_TEST_BOOT.
#   When the test exits otherwise, the guest prints @@EXIT=<status>@@ and
#   powers off. Console to stdout (and, as it comes, --log FILE). Exit status:
#     the test's exit status, when the guest reports it and no kernel problem
#       was logged in any boot;
#     99  a guest kernel logged an oops/BUG/WARNING/hung task/... (unless
#         --allow-kernel-issues); the test's status is printed to stderr;
#     124 timeout (guest watchdog at SECONDS-20 across all boots, qemu killed
#         at SECONDS; default 1200);
#     98  no exit marker (kernel panic, crash), or a boot that did not follow
#         a clean reboot;
#     97  dpkg -i of the --deb packages failed;
#     2   usage error.
#   --disk-size SIZE  grow the run's copy of the root file system (e.g. 8G).
#   --keep-disk FILE  keep the run's disk image (raw ext4) as FILE afterwards.
#   Env: UBLK_VM_KERNEL (7, the default, or 6.12), UBLK_VM_CACHE (default
#   /var/cache/ublk-http-vm), UBLK_VM_QEMU_ARGS (extra qemu arguments),
#   UBLK_VM_ROOTFS_EXTRA (see vm/rootfs.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
MEM=2048 SMP=2 TIMEOUT=1200 FILES=() DEBS=() ENVS=() APPEND="" ALLOW_ISSUES=0 LOG="" DISK_SIZE="" KEEP_DISK=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mem) MEM="$2"; shift 2 ;;
        --smp) SMP="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --file) FILES+=("$2"); shift 2 ;;
        --deb) DEBS+=("$2"); shift 2 ;;
        --env) ENVS+=("$2"); shift 2 ;;
        --append) APPEND="$2"; shift 2 ;;
        --disk-size) DISK_SIZE="$2"; shift 2 ;;
        --allow-kernel-issues) ALLOW_ISSUES=1; shift ;;
        --log) LOG="$2"; shift 2 ;;
        --keep-disk) KEEP_DISK="$2"; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "run-systemd.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
SCRIPT="$1"; shift
err() { echo "run-systemd.sh: $*" >&2; exit 2; }
[[ -f "$SCRIPT" ]] || err "no such script: $SCRIPT"
[[ "$TIMEOUT" =~ ^[0-9]+$ && "$TIMEOUT" -ge 60 ]] || err "--timeout must be >= 60"
for d in "${DEBS[@]}"; do [[ -f "$d" && "$d" == *.deb ]] || err "no such .deb: $d"; done

T0=$(date +%s.%N)
vm_ensure qemu-system-x86_64:qemu-system-x86 debugfs:e2fsprogs resize2fs:e2fsprogs
KDIR="$("$VM_DIR/kernel.sh")"
KVER="$(cat "$KDIR/version")"
IMG="$("$VM_DIR/rootfs.sh")"
[[ "$(cat "$IMG.kver")" == "$KVER" ]] || err "$IMG holds modules of $(cat "$IMG.kver"), not $KVER"

touch "$IMG.kver"    # in use (vm/rootfs.sh prunes images unused for 14 days)
mkdir -p "$VM_CACHE/runs"
# Leftovers of runs killed hard (each holds a disk copy).
find "$VM_CACHE/runs" -mindepth 1 -maxdepth 1 -name 'run.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
WORK="$(mktemp -d "$VM_CACHE/runs/run.XXXXXX")"
QPID=""
cleanup() {
    if [[ -n "$QPID" ]]; then kill "$QPID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the run's disk -----------------------------------------------------------------------------
DISK="$WORK/disk.img"
cp --reflink=auto --sparse=always "$IMG" "$DISK"
if [[ -n "$DISK_SIZE" ]]; then
    truncate -s "$DISK_SIZE" "$DISK" || err "bad --disk-size $DISK_SIZE"
    resize2fs "$DISK" >"$WORK/resize.log" 2>&1 || { cat "$WORK/resize.log" >&2; err "resize2fs to $DISK_SIZE failed"; }
fi

# ---- what goes into it: staged under $R, then written with debugfs ------------------------------
R="$WORK/root"
G="$VM_DIR/systemd-guest"
mkdir -p "$R/test" "$R/etc/systemd/system/multi-user.target.wants" "$R/usr/local/sbin" "$R/usr/local/bin" \
         "$R/usr/lib/systemd/system-shutdown" "$R/etc/sysctl.d" "$R/etc/nginx"
cp "$SCRIPT" "$R/test/script"
chmod 0755 "$R/test/script"
GTO=$((TIMEOUT - 20))
{
    echo "#!/usr/bin/bash"
    echo "# generated by vm/run-systemd.sh"
    for e in "${ENVS[@]}"; do
        [[ "$e" == *=* ]] || err "--env wants NAME=VALUE"
        printf 'export %s=%q\n' "${e%%=*}" "${e#*=}"
    done
    printf 'exec /usr/bin/bash /test/script'
    for a in "$@"; do printf ' %q' "$a"; done
    printf '\n'
} > "$R/test/main"
chmod 0755 "$R/test/main"
# The guest watchdog's deadline (epoch seconds; the guest clock is the host's).
echo $(( $(date +%s) + GTO )) > "$R/test/deadline"
if [[ ${#DEBS[@]} -gt 0 ]]; then
    mkdir -p "$R/test/debs"
    i=0
    # Numbered, so dpkg -i gets them in the order given.
    for d in "${DEBS[@]}"; do i=$((i + 1)); cp "$d" "$R/test/debs/$(printf %02d "$i")-$(basename "$d")"; done
fi
install -m 0644 "$G/ublk-test.service" "$R/etc/systemd/system/ublk-test.service"
ln -s ../ublk-test.service "$R/etc/systemd/system/multi-user.target.wants/ublk-test.service"
install -m 0755 "$G/ublk-test-boot" "$R/usr/local/sbin/ublk-test-boot"
install -m 0755 "$G/kmod-load" "$R/usr/local/sbin/kmod-load"
install -m 0755 "$G/ublk-test-kscan" "$R/usr/lib/systemd/system-shutdown/ublk-test-kscan"
install -m 0644 "$G/90-ublk-test.conf" "$R/etc/sysctl.d/90-ublk-test.conf"
install -m 0755 "$VM_DIR/guest/nginx-start" "$R/usr/local/bin/nginx-start"
install -m 0755 "$VM_DIR/guest/nginx-stop" "$R/usr/local/bin/nginx-stop"
install -m 0644 "$VM_DIR/guest/nginx.conf.in" "$R/etc/nginx/ublk-test.conf.in"
VM_STAGE="$R"
for spec in "${FILES[@]}"; do
    [[ "$spec" == *:/* ]] || err "--file wants SRC:/ABS/DST, got $spec"
    src="${spec%%:/*}"; dst="/${spec#*:/}"
    dst="$(realpath -m -s "$dst")"
    # merged /usr: /bin /sbin /lib /lib64 are symlinks into /usr in the image
    case "$dst" in /bin/*|/sbin/*|/lib/*|/lib64/*) dst="/usr$dst" ;; esac
    case "$dst" in
        /|/tmp|/tmp/*|/run|/run/*|/dev|/dev/*|/proc|/proc/*|/sys|/sys/*|/test|/test/*|/var/lib/ublk-test-runner*)
            err "--file destination $dst would be hidden by a guest mount, wiped at boot or clash with the runner" ;;
        /bin|/sbin|/lib|/lib64|/usr|/etc|/var|/usr/bin|/usr/sbin|/usr/lib) err "--file destination $dst: name a path below it" ;;
    esac
    [[ -e "$src" ]] || err "no such file: $src"
    vm_stage_file "$src" "$dst"
done

# debugfs commands: parents first; existing paths of the image (its
# manifest) are replaced (files, symlinks) or entered (directories, whose mode
# is left alone); new ones get the staged mode, owner root.
declare -A IN_IMAGE=()
while IFS= read -r p; do IN_IMAGE[$p]=1; done < "$IMG.manifest"
[[ "$R" =~ ^[A-Za-z0-9._/+@:=,~-]+$ ]] || err "unsupported character in the work directory $R (debugfs)"
CMDS="$WORK/debugfs.cmds"
: > "$CMDS"
while IFS= read -r rel; do
    p="$R$rel"
    [[ "$rel" =~ ^[A-Za-z0-9._/+@:=,~-]+$ ]] || err "unsupported character in guest path '$rel' (debugfs)"
    mode=$(stat -c '%a' "$p")
    if [[ -L "$p" ]]; then
        [[ -n "${IN_IMAGE[$rel]:-}" ]] && echo "rm $rel"
        t=$(readlink "$p")
        [[ "$t" =~ ^[A-Za-z0-9._/+@:=,~-]+$ ]] || err "unsupported character in symlink target '$t' (debugfs)"
        echo "symlink $rel $t"
    elif [[ -d "$p" ]]; then
        if [[ -z "${IN_IMAGE[$rel]:-}" ]]; then
            echo "mkdir $rel"
            printf 'sif %s mode 0%o\n' "$rel" $(( 8#40000 | 8#$mode ))
            echo "sif $rel uid 0"; echo "sif $rel gid 0"
        fi
    elif [[ -f "$p" ]]; then
        [[ -n "${IN_IMAGE[$rel]:-}" ]] && echo "rm $rel"
        echo "write $p $rel"
        printf 'sif %s mode 0%o\n' "$rel" $(( 8#100000 | 8#$mode ))
        echo "sif $rel uid 0"; echo "sif $rel gid 0"
    else
        err "$rel: only files, directories and symlinks can be copied in"
    fi
done < <(cd "$R" && find . -mindepth 1 | sed 's/^\.//' | LC_ALL=C sort) >> "$CMDS"
debugfs -w -f "$CMDS" "$DISK" >"$WORK/debugfs.out" 2>"$WORK/debugfs.err" || true
# debugfs prints a banner on stderr and reports errors there; it exits 0 regardless.
if grep -qv '^debugfs [0-9.]* (' "$WORK/debugfs.err"; then
    cat "$WORK/debugfs.err" >&2
    err "writing the test files into the disk image failed (debugfs; a --file destination that is a directory in the image?)"
fi
e2fsck -fn "$DISK" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log" >&2; vm_die "the disk image is damaged after debugfs"; }

# ---- boot -----------------------------------------------------------------------------------------
OUTLOG="$WORK/console.log"
# clearcpuid=cx16: without it the guest oopses at random under TCG here.
# mitigations=off: retpolines etc. cost ~1/3 of the syscall speed under TCG.
# log_buf_len: keep the whole kernel log for the end-of-boot scan.
CMDLINE="console=ttyS0 quiet panic=-1 clearcpuid=cx16 mitigations=off log_buf_len=8M root=/dev/nvme0n1 rootfstype=ext4 rw rootwait $APPEND"
# No -no-reboot: a guest reboot restarts the machine on the same disk.
# cache=unsafe: the disk is thrown away after the run (qemu flushes its
# writes to the file when it exits, for --keep-disk).
# shellcheck disable=SC2206
QEMU=(qemu-system-x86_64 -accel tcg,thread=multi -cpu max,la57=off -m "$MEM" -smp "$SMP"
      -nodefaults -no-user-config -display none -serial stdio
      -drive "file=$DISK,if=none,id=root,format=raw,cache=unsafe,discard=unmap"
      -device nvme,drive=root,serial=ublkroot
      -kernel "$KDIR/vmlinuz" -append "$CMDLINE"
      ${UBLK_VM_QEMU_ARGS:-})
T1=$(date +%s.%N)
set +e
# With panic=-1 and reboots allowed, a panicking guest would come back up:
# stop qemu when the console shows a panic instead.  (A shell loop: mawk
# would hold back its input until a buffer fills.)
watch_console() {
    local line seen=0
    while IFS= read -r line || [[ -n "$line" ]]; do
        printf '%s\n' "$line"
        if [[ $seen == 0 && "$line" =~ ^\[\ *[0-9]+\.[0-9]+\]\ Kernel\ panic\ -\ not\ syncing ]]; then
            seen=1
            ( sleep 2; kill "$(cat "$WORK/qemu.pid" 2>/dev/null)" 2>/dev/null ) &
        fi
    done
}
{
    timeout -k 5 "$TIMEOUT" "${QEMU[@]}" -pidfile "$WORK/qemu.pid" </dev/null 2>"$WORK/qemu.err"
    echo $? > "$WORK/qemu.rc"
} | sed -u 's/\r$//' | tee "$OUTLOG" ${LOG:+"$LOG"} | watch_console &
PIPEPID=$!
for _ in $(seq 50); do [[ -s "$WORK/qemu.pid" ]] && break; sleep 0.1; done
QPID=$(cat "$WORK/qemu.pid" 2>/dev/null)
wait "$PIPEPID"
QPID=""
QRC=$(cat "$WORK/qemu.rc" 2>/dev/null || echo "?")
set -e
T2=$(date +%s.%N)
if [[ -n "$KEEP_DISK" ]]; then mv "$DISK" "$KEEP_DISK"; vm_log "disk image kept: $KEEP_DISK"; fi

if [[ -s "$WORK/qemu.err" ]]; then echo "---- qemu stderr ----" >&2; cat "$WORK/qemu.err" >&2; fi
boots=$(grep -ao '@@BOOTED boot=[0-9]* uptime=[0-9.]*' "$OUTLOG" | sed 's/@@BOOTED boot=\([0-9]*\) uptime=\(.*\)/\1:\2s/' | tr "\n" " " | sed "s/ $//" || true)
summary() { printf '[vm] %s (boots: %s; qemu %.1fs, total %.1fs)\n' "$1" "${boots:-none}" \
    "$(awk "BEGIN{print $T2 - $T1}")" "$(awk "BEGIN{print $T2 - $T0}")" >&2; }

KPAT='blocked for more than|BUG:|kernel BUG|Oops|WARNING:|general protection fault|soft lockup|hard LOCKUP|rcu_.*stall|RCU stall|Kernel panic|UBSAN:|KASAN:|refcount_t:|list_add corruption|list_del corruption'
issues=$( { grep -ao '@@KERNEL-ISSUES=[0-9]*@@' "$OUTLOG" || true; } | tr -dc '0-9\n' | awk '{s += $1} END {print s + 0}')
console_issues=$(grep -acE "^\[ *[0-9]+\.[0-9]+\] .*($KPAT)" "$OUTLOG" || true)
rc=$(grep -ao '@@EXIT=[0-9]*@@' "$OUTLOG" | tail -n 1 | tr -dc 0-9 || true)

if grep -aqE '^\[ *[0-9]+\.[0-9]+\] Kernel panic - not syncing' "$OUTLOG"; then
    summary "FAILED: guest kernel panic (qemu stopped)"; exit 98
fi
if [[ "$QRC" == 124 || "$QRC" == 137 ]]; then
    summary "TIMEOUT: qemu killed after ${TIMEOUT}s"; exit 124
fi
if grep -aq '@@GUEST-TIMEOUT' "$OUTLOG"; then
    summary "TIMEOUT: the test ran longer than ${GTO}s"; exit 124
fi
if [[ -z "$rc" ]]; then
    why="kernel panic or guest crash?"
    grep -aq '@@SHUTDOWN=poweroff' "$OUTLOG" && why="the guest powered off before the test exited"
    summary "FAILED: no @@EXIT marker ($why), qemu status $QRC"; exit 98
fi
if grep -aq '@@UNEXPECTED-REBOOT' "$OUTLOG"; then
    summary "FAILED: the guest rebooted without a clean shutdown"; exit 98
fi
if [[ "$issues" -gt 0 || "$console_issues" -gt 0 ]]; then
    if [[ $ALLOW_ISSUES == 1 ]]; then
        vm_log "kernel issues logged ($issues in the end-of-boot scans), ignored (--allow-kernel-issues)"
    else
        summary "FAILED: the guest kernel logged $issues oops/BUG/WARNING/hung-task lines (test status $rc)"
        exit 99
    fi
fi
if ! grep -aq '@@KERNEL-ISSUES=' "$OUTLOG"; then
    vm_log "warning: no end-of-boot kernel log scan was reported"
fi
summary "test exit status $rc"
exit "$rc"
