#!/usr/bin/bash
# Guest side of vm/systemd-selftest.sh (runs in the systemd guest as
# /test/script, once per boot; vm/run-systemd.sh).  Boot 1 checks systemd,
# udev, modules, the --deb package and nginx, writes a file and reboots;
# boot 2 checks the file survived and the system came back, then exits with
# the number of failed checks of both boots (0 = pass).
set -uo pipefail
S="$UBLK_TEST_STATE"
pass=$(cat "$S/pass" 2>/dev/null || echo 0) fail=$(cat "$S/fail" 2>/dev/null || echo 0)
ok()  { echo "selftest[boot $UBLK_TEST_BOOT]: ok   - $*"; pass=$((pass + 1)); }
bad() { echo "selftest[boot $UBLK_TEST_BOOT]: FAIL - $*"; fail=$((fail + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
save() { echo "$pass" > "$S/pass"; echo "$fail" > "$S/fail"; sync; }
t() { date +%s.%N; }
el() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }

running_or_degraded() { # systemctl is-system-running --wait, within 120 s
    local st
    st=$(timeout 120 systemctl is-system-running --wait 2>&1)
    echo "selftest: system state: $st"
    case "$st" in
        running) return 0 ;;
        degraded) systemctl --failed --no-pager; return 0 ;;
        *) systemctl list-jobs --no-pager; return 1 ;;
    esac
}

echo "selftest[boot $UBLK_TEST_BOOT]: kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo), uptime $(cut -d' ' -f1 /proc/uptime)s"
check "PID 1 is systemd" test "$(cat /proc/1/comm)" = systemd
t0=$(t)
check "systemctl is-system-running --wait: running or degraded" running_or_degraded
echo "selftest: is-system-running --wait took $(el "$t0" "$(t)") s"
check "root is the NVMe disk, read-write" bash -c 'findmnt -no SOURCE,OPTIONS / | grep -qE "^/dev/nvme0n1 rw,"'
check "systemd-udevd is active" systemctl -q is-active systemd-udevd.service
check "UBLK_TEST_STATE is /var/lib/ublk-test" test "$S" = /var/lib/ublk-test

case "$UBLK_TEST_BOOT" in
1)
    check "modprobe ublk_drv" modprobe ublk_drv
    check "udevadm settle" udevadm settle --timeout=60
    check "/dev/ublk-control exists" test -c /dev/ublk-control
    check "udev rule (--file) made /dev/ublk-selftest-control" test -L /dev/ublk-selftest-control
    check "udevadm trigger" udevadm trigger
    check "udevadm settle after trigger" udevadm settle --timeout=60
    check "modprobe brd" modprobe brd rd_nr=1 rd_size=65536
    udevadm settle --timeout=60
    check "udev rule (--file) made /dev/ublk-selftest-ram0 -> ram0" \
        test "$(readlink -f /dev/ublk-selftest-ram0)" = /dev/ram0
    # A rule added at run time, then reload + trigger.
    echo 'KERNEL=="loop0", SUBSYSTEM=="block", SYMLINK+="ublk-selftest-loop0"' > /etc/udev/rules.d/98-ublk-selftest-runtime.rules
    check "modprobe loop" modprobe loop
    check "udevadm control --reload" udevadm control --reload
    check "udevadm trigger --action=change loop0" udevadm trigger --action=change --sysname-match=loop0
    udevadm settle --timeout=60
    check "run-time udev rule made /dev/ublk-selftest-loop0 -> loop0" \
        test "$(readlink -f /dev/ublk-selftest-loop0)" = /dev/loop0
    check "modprobe dm-mod: /dev/mapper/control" bash -c 'modprobe dm-mod && udevadm settle && test -c /dev/mapper/control'
    check "kmod-load ublk_drv (loaded: no-op)" kmod-load ublk_drv
    check "mkfs.ext4 + mount /dev/ram0" bash -c 'mkfs.ext4 -q -F /dev/ram0 && mkdir -p /mnt/ram && mount /dev/ram0 /mnt/ram && umount /mnt/ram'
    check "--deb package installed (dpkg -s)" bash -c 'dpkg -s ublk-selftest-dummy | grep -q "^Status: install ok installed"'
    check "--deb package's unit started by its postinst" systemctl -q is-active ublk-selftest-dummy.service
    check "tools: fio curl jq nginx ip cmp" bash -c 'fio --version && curl --version && jq --version && nginx -v && ip -V && cmp --version' >/dev/null 2>&1
    head -c 1000000 /dev/urandom > "$S/blob"
    check "nginx-start + curl range (206)" bash -c \
        'nginx-start "$1" 8080 && test "$(curl -s -o /dev/null -w "%{http_code}" -r 10-19 http://127.0.0.1:8080/blob)" = 206 && nginx-stop' _ "$S"
    sha256sum "$S/blob" > "$S/blob.sha256"
    echo "written in boot 1" > /root/ublk-selftest-root-file
    save
    echo "selftest: rebooting"
    systemctl reboot
    # systemd stops this test (SIGTERM) on the way down.
    sleep 600
    exit 1
    ;;
2)
    check "file written in boot 1 survived (state dir)" sha256sum -c --quiet "$S/blob.sha256"
    check "file written in boot 1 survived (/root)" grep -qx "written in boot 1" /root/ublk-selftest-root-file
    check "ublk_drv is not loaded after the reboot" test ! -e /sys/module/ublk_drv
    check "modprobe ublk_drv again: /dev/ublk-control" bash -c 'modprobe ublk_drv && udevadm settle && test -c /dev/ublk-control'
    check "--deb package's unit enabled: active again" systemctl -q is-active ublk-selftest-dummy.service
    check "journal persisted: journalctl --list-boots shows 2 boots" \
        test "$(journalctl --list-boots --no-pager 2>/dev/null | grep -cE '[0-9a-f]{32}')" -ge 2
    echo "selftest: $pass passed, $fail failed"
    exit $((fail > 0 ? 1 : 0))
    ;;
*)
    bad "unexpected boot number $UBLK_TEST_BOOT"
    exit 1
    ;;
esac
