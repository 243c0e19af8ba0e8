#!/usr/bin/env bash
# Usage: vm/systemd-selftest.sh
#   Smoke test of the systemd guest (vm/rootfs.sh, vm/run-systemd.sh): builds
#   the rootfs when not cached, makes a tiny .deb (a oneshot unit its postinst
#   enables and starts), boots, and checks in the guest (vm/selftest/systemd.sh):
#   PID 1 is systemd; `systemctl is-system-running --wait` gives running or
#   degraded (failed units printed); modprobe ublk_drv gives /dev/ublk-control;
#   udevd runs, `udevadm trigger`/`settle` work, a udev rule put in by --file
#   (/etc/udev/rules.d) links /dev/ublk-selftest-control and -ram0 (brd), a
#   rule written at run time links -loop0 after `udevadm control --reload` +
#   trigger; dm-mod; the .deb is installed and its unit active; nginx-start +
#   curl range. Then `systemctl reboot`, and in boot 2: files written in boot
#   1 are there, ublk_drv loads again, the .deb's unit is active again, the
#   journal has both boots. Exits non-zero when any check fails. Prints timings.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

t() { date +%s.%N; }
el() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }
T0=$(t)
KDIR="$("$VM_DIR/kernel.sh")"
T1=$(t)
IMG="$("$VM_DIR/rootfs.sh")"
T2=$(t)
vm_log "kernel $(cat "$KDIR/version") ($(el "$T0" "$T1") s); rootfs $IMG ($(el "$T1" "$T2") s)"

WORK="$(mktemp -d /tmp/ublk-vm-systemd-selftest.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# udev rules put in before the boot.
cat > "$WORK/99-ublk-selftest.rules" <<'R'
KERNEL=="ublk-control", SYMLINK+="ublk-selftest-control"
KERNEL=="ram0", SUBSYSTEM=="block", SYMLINK+="ublk-selftest-ram0"
R

# A tiny package: a oneshot unit, enabled and started by its postinst.
P="$WORK/pkg"
mkdir -p "$P/DEBIAN" "$P/usr/lib/systemd/system"
cat > "$P/DEBIAN/control" <<'C'
Package: ublk-selftest-dummy
Version: 1.0
Architecture: all
Maintainer: ublk-http selftest <root@localhost>
Description: vm/systemd-selftest.sh test package
 A oneshot unit, enabled and started by the postinst.
C
cat > "$P/usr/lib/systemd/system/ublk-selftest-dummy.service" <<'U'
[Unit]
Description=ublk-http selftest dummy unit

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true

[Install]
WantedBy=multi-user.target
U
cat > "$P/DEBIAN/postinst" <<'S'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    systemctl daemon-reload
    systemctl enable --now ublk-selftest-dummy.service
fi
S
chmod 0755 "$P/DEBIAN/postinst"
dpkg-deb --root-owner-group -b "$P" "$WORK/ublk-selftest-dummy_1.0_all.deb" >/dev/null

set +e
T3=$(t)
"$VM_DIR/run-systemd.sh" --timeout 600 --log "$WORK/console.log" \
    --file "$WORK/99-ublk-selftest.rules:/etc/udev/rules.d/99-ublk-selftest.rules" \
    --deb "$WORK/ublk-selftest-dummy_1.0_all.deb" \
    "$VM_DIR/selftest/systemd.sh"
rc=$?
set -e
T4=$(t)
boots=$(grep -ao '@@BOOTED boot=[0-9]* uptime=[0-9.]*s' "$WORK/console.log" | sed 's/@@BOOTED boot=\([0-9]*\) uptime=/boot \1 at /' | paste -sd, | sed 's/,/, /g' || true)
if [[ $rc -ne 0 ]]; then
    vm_log "systemd selftest FAILED: run-systemd.sh exited $rc (boots: ${boots:-none})"
    exit 1
fi
grep -q '^selftest: [0-9]* passed, 0 failed$' "$WORK/console.log" || { vm_log "systemd selftest FAILED: no summary line"; exit 1; }
[[ $(grep -c '^@@BOOTED boot=' "$WORK/console.log") -eq 2 ]] || { vm_log "systemd selftest FAILED: expected 2 boots"; exit 1; }
vm_log "systemd selftest passed: $(grep -a '^selftest: [0-9]* passed' "$WORK/console.log"); kernel $(cat "$KDIR/version");" \
    "test started (guest uptime): $boots; VM run $(el "$T3" "$T4") s; total $(el "$T0" "$T4") s"
