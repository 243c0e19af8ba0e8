#!/usr/bin/env bash
# Usage: vm/selftest.sh [--quick]
#   Smoke test of the VM harness: builds an initramfs, boots it (adding a
#   Foundation "hello" Swift binary via run.sh --bin when swiftc is available)
#   and checks in the
#   guest: ublk_drv + /dev/ublk-control, brd + mkfs.ext4 + mount, mkfs.ext4 -d +
#   util-linux losetup, nbd, nginx byte ranges via curl (206), a 5 s fio job on
#   /dev/ram0, orphan reaping.  Unless --quick, it then checks that run.sh
#   reports a guest hung task with exit status 99.
#   Prints timings; exits non-zero on any failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
QUICK=0
[[ "${1:-}" == --quick ]] && QUICK=1

t() { date +%s.%N; }
el() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }
T0=$(t)
KDIR="$("$VM_DIR/kernel.sh")"
T1=$(t)
vm_log "kernel: $(cat "$KDIR/package") -> $KDIR ($(el "$T0" "$T1") s)"

WORK="$(mktemp -d /tmp/ublk-vm-selftest.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
extra=()
SWIFTC="$(command -v swiftc || true)"
[[ -z "$SWIFTC" && -x /opt/swift/usr/bin/swiftc ]] && SWIFTC=/opt/swift/usr/bin/swiftc
if [[ -n "$SWIFTC" ]]; then
    cat > "$WORK/hello.swift" <<'S'
import Foundation
let d = Data([1, 2, 3])
let s = String(format: "%d", 40 + d.count - 1)
print("hello from swift \(s)")
S
    if "$SWIFTC" -O "$WORK/hello.swift" -o "$WORK/swift-hello" >"$WORK/swiftc.log" 2>&1; then
        extra+=(--bin "$WORK/swift-hello")
    else
        vm_log "swiftc failed, skipping the Swift check:"; cat "$WORK/swiftc.log" >&2
    fi
fi
T2=$(t)
INITRD="$VM_CACHE/selftest.cpio"
"$VM_DIR/initramfs.sh" "$INITRD"
T3=$(t)
vm_log "initramfs built in $(el "$T2" "$T3") s"

set +e
"$VM_DIR/run.sh" --initrd "$INITRD" --timeout 600 --log "$WORK/smoke.log" "${extra[@]}" "$VM_DIR/selftest/smoke.sh"
rc=$?
set -e
T4=$(t)
boot=$(grep -ao '@@BOOTED uptime=[0-9.]*' "$WORK/smoke.log" | head -n 1 | sed 's/.*=//' || true)
if [[ $rc -ne 0 ]]; then
    vm_log "selftest FAILED: smoke run exited $rc"
    exit 1
fi
grep -q '^selftest: .* 0 failed$' "$WORK/smoke.log" || { vm_log "selftest FAILED: no summary line"; exit 1; }

hung="skipped"
if [[ $QUICK == 0 ]]; then
    set +e
    vm_log "provoking a hung task in a second VM (expect run.sh to exit 99; ~50 s)"
    "$VM_DIR/run.sh" --initrd "$INITRD" --timeout 300 --log "$WORK/hung.log" "$VM_DIR/selftest/hung.sh" \
        >"$WORK/hung.out" 2>&1
    rc=$?
    set -e
    if [[ $rc -ne 99 ]] || ! grep -q 'blocked for more than' "$WORK/hung.log"; then
        cat "$WORK/hung.out" >&2
        vm_log "selftest FAILED: provoked hung task gave exit $rc (want 99)"
        exit 1
    fi
    grep -m1 'blocked for more than' "$WORK/hung.log" >&2
    hung="ok (run.sh exited 99 as expected)"
fi
T5=$(t)
vm_log "selftest passed: kernel $(cat "$KDIR/version"); guest boot ${boot}s; smoke VM run $(el "$T3" "$T4") s; hung-task check $hung $(el "$T4" "$T5") s; total $(el "$T0" "$T5") s"
