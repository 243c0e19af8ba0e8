#!/usr/bin/env bash
# Usage: tests/vm.sh [SUITE...]
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
INITRD="$VM_CACHE/initramfs-tests.cpio.gz"
echo "[tests] building $INITRD"
vm/initramfs.sh "$INITRD" --bin "$BIN:/usr/local/bin/ublk-http" --bin /usr/bin/jq --bin /usr/bin/setpriv >/dev/null
failed=()
for s in "${SUITES[@]}"; do
    echo "[tests] suite $s"
    if ! vm/run.sh --initrd "$INITRD" --timeout "${UBLK_VM_TIMEOUT:-1500}" --file "$ROOT/tests/vm:/tests" \
        "tests/vm/$s.sh"; then
        failed+=("$s")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then echo "[tests] FAILED suites: ${failed[*]}"; exit 1; fi
echo "[tests] all VM suites passed: ${SUITES[*]}"
