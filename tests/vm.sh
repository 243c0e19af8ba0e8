#!/usr/bin/env bash
# Usage: tests/vm.sh [SUITE...]   (UBLK_VM_SMP=N: N vCPUs, default 2)
#   Runs the end-to-end suites of tests/vm/ (default: all of them, each SUITE.sh)
#   inside the qemu VM on the real ublk driver (vm/run.sh). Builds the static
#   release binary and the initramfs first. Exits non-zero if any suite fails or
#   the guest kernel logged an oops, a BUG or a hung task.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SUITES=("$@")
if [[ ${#SUITES[@]} -eq 0 ]]; then
    SUITES=(); for f in tests/vm/*.sh; do [[ "$(basename "$f")" == lib.sh ]] || SUITES+=("$(basename "$f" .sh)"); done
fi
vm/kernel.sh >/dev/null
BIN="$(tests/build-static.sh)"
VM_CACHE="${UBLK_VM_CACHE:-/var/cache/ublk-http-vm}"
mkdir -p "$VM_CACHE"
# One initramfs per run: several checkouts may run their suites at once.
INITRD="$(mktemp "$VM_CACHE/initramfs-tests.XXXXXX.cpio.gz")"
echo "[tests] building $INITRD"
# Device mapper (dm-flakey, dm-error) for the suites that make a disk fail under the cache.
vm/initramfs.sh "$INITRD" --bin "$BIN:/usr/local/bin/ublk-http" --bin /usr/bin/jq --bin /usr/bin/setpriv \
    --bin /usr/sbin/dmsetup --module dm_mod --module dm_flakey --module dm_delay >/dev/null
failed=()
LOG=$(mktemp /tmp/ublk-http-vm-suite.XXXXXX)
trap 'rm -f "$LOG" "$INITRD"' EXIT
for s in "${SUITES[@]}"; do
    echo "[tests] suite $s"
    # Under TCG the guest kernel now and then oopses while booting, before
    # its init runs (no @@BOOTED line): that is qemu's, not the suite's, and
    # the suite is booted again (twice at most). A failure after boot counts.
    for attempt in 1 2 3; do
        if vm/run.sh --initrd "$INITRD" --timeout "${UBLK_VM_TIMEOUT:-1500}" --smp "${UBLK_VM_SMP:-2}" --file "$ROOT/tests/vm:/tests" \
            --log "$LOG" "tests/vm/$s.sh"; then
            break
        fi
        if grep -aq '@@BOOTED' "$LOG" || [[ $attempt == 3 ]]; then
            failed+=("$s")
            break
        fi
        echo "[tests] the guest died while booting, before suite $s started: booting again"
    done
done
if [[ ${#failed[@]} -gt 0 ]]; then echo "[tests] FAILED suites: ${failed[*]}"; exit 1; fi
echo "[tests] all VM suites passed: ${SUITES[*]}"
