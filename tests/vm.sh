#!/usr/bin/env bash
# Usage: tests/vm.sh [SUITE[@KERNEL]...]
#   Runs the end-to-end suites of tests/vm/ inside the qemu VM on the real ublk
#   driver (vm/run.sh). Builds the static release binary and one initramfs per
#   kernel first. KERNEL is 7 (the newest trixie-backports 7.x, the default, or
#   $UBLK_VM_KERNEL) or 6.12. With no SUITE: every suite on 7.x, then the
#   suites listed in tests/vm/on-6.12 on 6.12 (the engine and the copy data
#   path, which 7.x's zero copy replaces). Up to 7 suites share a boot
#   (UBLK_VM_GROUP; tests/vm-suites.sh resets the guest between them). A
#   suite boots with 2 vCPUs unless a line "# vm-smp: N" in it asks for N
#   (UBLK_VM_SMP overrides both). Exits non-zero if any suite fails or
#   the guest kernel logged an oops, a BUG or a hung task.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEFAULT_KERNEL="${UBLK_VM_KERNEL:-7}"
SUITES=()
for a in "$@"; do
    if [[ "$a" == *@* ]]; then SUITES+=("$a"); else SUITES+=("$a@$DEFAULT_KERNEL"); fi
done
if [[ $# -eq 0 ]]; then
    for f in tests/vm/*.sh; do [[ "$(basename "$f")" == lib.sh ]] || SUITES+=("$(basename "$f" .sh)@$DEFAULT_KERNEL"); done
    if [[ "$DEFAULT_KERNEL" != 6.12 ]]; then
        while read -r s; do [[ -n "$s" && "$s" != \#* ]] && SUITES+=("$s@6.12"); done < tests/vm/on-6.12
    fi
fi
for s in "${SUITES[@]}"; do
    [[ -f "tests/vm/${s%@*}.sh" ]] || { echo "[tests] no suite tests/vm/${s%@*}.sh" >&2; exit 2; }
    case "${s#*@}" in 7|6.12) ;; *) echo "[tests] unknown kernel in $s (7 or 6.12)" >&2; exit 2 ;; esac
done
BIN="$(tests/build-static.sh)"
VM_CACHE="${UBLK_VM_CACHE:-/var/cache/ublk-http-vm}"
mkdir -p "$VM_CACHE"
declare -A INITRDS=()
LOG=$(mktemp /tmp/ublk-http-vm-suite.XXXXXX)
cleanup() {
    rm -f "$LOG"
    for f in "${INITRDS[@]}"; do rm -f "$f" "$f.kver" "$f.manifest"; done
}
trap cleanup EXIT
# One initramfs per run and kernel: several checkouts may run their suites at once.
initrd_for() { # KERNEL -> sets INITRD
    local k="$1"
    if [[ -z "${INITRDS[$k]:-}" ]]; then
        UBLK_VM_KERNEL="$k" vm/kernel.sh >/dev/null
        INITRDS[$k]="$(mktemp "$VM_CACHE/initramfs-tests.XXXXXX.cpio.gz")"
        echo "[tests] building ${INITRDS[$k]} for kernel $k"
        # Device mapper (dm-flakey, dm-delay) for the suites that make a disk fail under the cache.
        UBLK_VM_KERNEL="$k" vm/initramfs.sh "${INITRDS[$k]}" --bin "$BIN:/usr/local/bin/ublk-http" --bin /usr/bin/jq \
            --bin /usr/bin/setpriv --bin /usr/sbin/dmsetup --module dm_mod --module dm_flakey --module dm_delay >/dev/null
    fi
    INITRD="${INITRDS[$k]}"
}
# Boots: consecutive suites with the same kernel and vCPU count share one,
# at most UBLK_VM_GROUP (7) of them (tests/vm-suites.sh runs them in turn and
# puts the guest back between them); UBLK_VM_GROUP=1 boots once per suite.
GROUP="${UBLK_VM_GROUP:-7}"
smp_of() { # SUITE -> its vCPUs
    local n; n=$(sed -n 's/^# vm-smp: *\([0-9]*\)$/\1/p' "tests/vm/$1.sh" | head -n 1)
    echo "${UBLK_VM_SMP:-${n:-2}}"
}
# Suites of one kernel and vCPU count share boots, whatever their order (a
# 4-vCPU suite between two 2-vCPU ones does not cost the others a boot).
boots=()
declare -A open_boot=()
for spec in "${SUITES[@]}"; do
    key="${spec#*@}/$(smp_of "${spec%@*}")"
    i=${open_boot[$key]:-}
    if [[ -n $i && $(wc -w <<<"${boots[$i]}") -lt $GROUP ]]; then boots[$i]+=" $spec"
    else boots+=("$spec"); open_boot[$key]=$((${#boots[@]} - 1)); fi
done
failed=() times=()
for boot in "${boots[@]}"; do
    read -r -a specs <<<"$boot"
    k="${specs[0]#*@}" names=()
    for spec in "${specs[@]}"; do names+=("${spec%@*}"); done
    smp=$(smp_of "${names[0]}")
    initrd_for "$k"
    export UBLK_VM_KERNEL="$k"
    echo "[tests] suites ${names[*]} on kernel $k ($smp vCPUs, one boot)"
    started=$SECONDS rc=0
    # Under TCG the guest kernel now and then oopses while booting, before
    # its init runs (no @@BOOTED line): that is qemu's, not the suites', and
    # the guest is booted again (twice at most). A failure after boot counts.
    for attempt in 1 2 3; do
        rc=0
        vm/run.sh --initrd "$INITRD" --timeout "${UBLK_VM_TIMEOUT:-$((900 * ${#names[@]} + 300))}" --smp "$smp" \
            --file "$ROOT/tests/vm:/tests" --log "$LOG" tests/vm-suites.sh "${names[@]}" || rc=$?
        if [[ $rc -eq 0 ]] || grep -aq '@@BOOTED' "$LOG" || [[ $attempt == 3 ]]; then break; fi
        echo "[tests] the guest died while booting, before the suites started: booting again"
    done
    for n in "${names[@]}"; do
        # "@@SUITE NAME STATUS SECONDS@@" from tests/vm-suites.sh; a suite without one never finished.
        res=$(grep -ao "@@SUITE $n [0-9]* [0-9]*@@" "$LOG" | tail -n 1 | tr -d @)
        if [[ -z $res ]]; then
            failed+=("$n@$k(did not finish: vm/run.sh status $rc)")
        elif [[ $(cut -d' ' -f3 <<<"$res") != 0 ]]; then
            failed+=("$n@$k")
        elif [[ $rc -eq 99 ]]; then
            failed+=("$n@$k(the guest kernel logged an oops, a BUG or a hung task in this boot)")
        fi
        [[ -n $res ]] && times+=("$n@$k $(cut -d' ' -f4 <<<"$res")s")
    done
    times+=("[boot $((SECONDS - started))s]")
done
echo "[tests] time per suite: ${times[*]}"
if [[ ${#failed[@]} -gt 0 ]]; then echo "[tests] FAILED suites: ${failed[*]}"; exit 1; fi
echo "[tests] all VM suites passed: ${SUITES[*]}"
