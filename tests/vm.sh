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
#   (UBLK_VM_SMP overrides both). UBLK_VM_JOBS (2) boots run at once, each
#   boot's output printed whole when it ends. Exits non-zero if any suite
#   fails or the guest kernel logged an oops, a BUG or a hung task.
#   The suite `systemd` is the host service's (tests/vm-systemd.sh: the Debian
#   package, checked by tests/host/deb.sh, in a Debian guest with systemd as
#   PID 1, on 7.x); it runs as one more boot of the pool, in every full run.
#   So does `flashcache`: the flash-cache benchmark's smoke test (bench/run.sh
#   --suite flashcache --quick --no-kublk: every device set up, every case run,
#   the caches' counters read; no ratio is judged).
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
    SUITES+=("systemd@7" "flashcache@7")
fi
for s in "${SUITES[@]}"; do
    if [[ "${s%@*}" == systemd || "${s%@*}" == flashcache ]]; then
        [[ "${s#*@}" == 7 ]] || { echo "[tests] the ${s%@*} suite runs on 7 only" >&2; exit 2; }
        continue
    fi
    [[ -f "tests/vm/${s%@*}.sh" ]] || { echo "[tests] no suite tests/vm/${s%@*}.sh" >&2; exit 2; }
    case "${s#*@}" in 7|6.12) ;; *) echo "[tests] unknown kernel in $s (7 or 6.12)" >&2; exit 2 ;; esac
done
BIN="$(tests/build-static.sh)"
VM_CACHE="${UBLK_VM_CACHE:-/var/cache/ublk-http-vm}"
mkdir -p "$VM_CACHE"
declare -A INITRDS=()
cleanup() {
    for f in "${INITRDS[@]}"; do rm -f "$f" "$f.kver" "$f.manifest"; done
}
trap cleanup EXIT
# One initramfs per run and kernel: several checkouts may run their suites at once.
initrd_for() { # KERNEL -> builds INITRDS[KERNEL] once
    local k="$1"
    if [[ -z "${INITRDS[$k]:-}" ]]; then
        UBLK_VM_KERNEL="$k" vm/kernel.sh >/dev/null
        INITRDS[$k]="$(mktemp "$VM_CACHE/initramfs-tests.XXXXXX.cpio.gz")"
        echo "[tests] building ${INITRDS[$k]} for kernel $k"
        # Device mapper (dm-flakey, dm-delay) for the suites that make a disk fail under the cache;
        # veritysetup and dm-verity for the verity suite's trees and the kernel's reading of them.
        UBLK_VM_KERNEL="$k" vm/initramfs.sh "${INITRDS[$k]}" --bin "$BIN:/usr/local/bin/ublk-http" --bin /usr/bin/jq \
            --bin /usr/bin/setpriv --bin /usr/sbin/dmsetup --bin /usr/sbin/veritysetup \
            --module dm_mod --module dm_flakey --module dm_delay --module dm_verity >/dev/null
    fi
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
    if [[ $spec == systemd@* || $spec == flashcache@* ]]; then boots+=("$spec"); continue; fi  # a guest of its own kind
    key="${spec#*@}/$(smp_of "${spec%@*}")"
    i=${open_boot[$key]:-}
    if [[ -n $i && $(wc -w <<<"${boots[$i]}") -lt $GROUP ]]; then boots[$i]+=" $spec"
    else boots+=("$spec"); open_boot[$key]=$((${#boots[@]} - 1)); fi
done
# Boots run side by side, UBLK_VM_JOBS (2) at a time: a TCG guest keeps a
# little over one host core busy (its vCPUs wait on timers, sleeps and each
# other), so two guests on a 2-core host take far less than twice one's time.
# Each boot's output is kept apart and printed whole when the boot ends.
JOBS="${UBLK_VM_JOBS:-2}"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "[tests] UBLK_VM_JOBS must be a positive number" >&2; exit 2; }
OUT=$(mktemp -d /tmp/ublk-http-vm-boots.XXXXXX)
for boot in "${boots[@]}"; do [[ $boot == systemd@* || $boot == flashcache@* ]] && continue; k="${boot%% *}"; initrd_for "${k#*@}"; done
# run_systemd I: the host service's suite; the same result lines as run_boot.
run_systemd() {
    local i=$1 started=$SECONDS rc=0 dir deb
    dir=$(mktemp -d "$OUT/deb.XXXXXX")
    {
        echo "[tests] suite systemd: the Debian package, then tests/vm-systemd.sh (Debian guest, systemd as PID 1, kernel 7)"
        if ! deb=$(scripts/build-deb.sh --out "$dir" 2>"$dir/build.log"); then
            tail -n 30 "$dir/build.log"; echo "[tests] scripts/build-deb.sh failed"; rc=1
        else
            tests/host/deb.sh --deb "$deb" || rc=1
            tests/vm-systemd.sh --deb "$deb" || rc=1
        fi
    } >"$OUT/$i.out" 2>&1
    { [[ $rc -eq 0 ]] || echo "fail systemd@7"; echo "time systemd@7 $((SECONDS - started))s"; } >"$OUT/$i.res"
    echo "time [boot $((SECONDS - started))s]" >>"$OUT/$i.res"
}
# run_flashcache I: the flash-cache benchmark's smoke test; the same result lines.
run_flashcache() {
    local i=$1 started=$SECONDS rc=0 dir
    dir=$(mktemp -d /tmp/ublk-http-flashcache-quick.XXXXXX)
    {
        echo "[tests] suite flashcache: bench/run.sh --suite flashcache --quick --no-kublk --out $dir"
        if bench/run.sh --suite flashcache --quick --no-kublk --bin "$BIN" --out "$dir" >"$dir/run.log" 2>&1; then
            echo "flashcache smoke test passed ($dir)"
        else
            tail -n 40 "$dir/run.log"; echo "flashcache smoke test FAILED ($dir/run.log)"; rc=1
        fi
    } >"$OUT/$i.out" 2>&1
    { [[ $rc -eq 0 ]] || echo "fail flashcache@7"; echo "time flashcache@7 $((SECONDS - started))s"; } >"$OUT/$i.res"
    echo "time [boot $((SECONDS - started))s]" >>"$OUT/$i.res"
}
# run_boot I: boots[I] in one VM; its output in $OUT/I.out, one "fail ..." or
# "time ..." line per suite in $OUT/I.res.
run_boot() {
    local i=$1 specs names=() k smp started=$SECONDS rc=0 attempt n res
    read -r -a specs <<<"${boots[$i]}"
    k="${specs[0]#*@}"
    for spec in "${specs[@]}"; do names+=("${spec%@*}"); done
    smp=$(smp_of "${names[0]}")
    export UBLK_VM_KERNEL="$k"
    {
        echo "[tests] suites ${names[*]} on kernel $k ($smp vCPUs, one boot)"
        # Under TCG the guest kernel now and then oopses while booting, before
        # its init runs (no @@BOOTED line): that is qemu's, not the suites', and
        # the guest is booted again (twice at most). A failure after boot counts.
        for attempt in 1 2 3; do
            rc=0
            vm/run.sh --initrd "${INITRDS[$k]}" --timeout "${UBLK_VM_TIMEOUT:-$((900 * ${#names[@]} + 300))}" --smp "$smp" \
                --file "$ROOT/tests/vm:/tests" --log "$OUT/$i.log" tests/vm-suites.sh "${names[@]}" || rc=$?
            if [[ $rc -eq 0 ]] || grep -aq '@@BOOTED' "$OUT/$i.log" || [[ $attempt == 3 ]]; then break; fi
            echo "[tests] the guest died while booting, before the suites started: booting again"
        done
    } >"$OUT/$i.out" 2>&1
    for n in "${names[@]}"; do
        # "@@SUITE NAME STATUS SECONDS@@" from tests/vm-suites.sh; a suite without one never finished.
        res=$(grep -ao "@@SUITE $n [0-9]* [0-9]*@@" "$OUT/$i.log" | tail -n 1 | tr -d @)
        if [[ -z $res ]]; then
            echo "fail $n@$k(did not finish: vm/run.sh status $rc)"
        elif [[ $(cut -d' ' -f3 <<<"$res") != 0 ]]; then
            echo "fail $n@$k"
        elif [[ $rc -eq 99 ]]; then
            echo "fail $n@$k(the guest kernel logged an oops, a BUG or a hung task in this boot)"
        fi
        [[ -n $res ]] && echo "time $n@$k $(cut -d' ' -f4 <<<"$res")s"
    done >"$OUT/$i.res"
    echo "time [boot $((SECONDS - started))s]" >>"$OUT/$i.res"
}
# Boots of more suites first, so that the short ones fill in at the end.
# The systemd suite, one but long (a package build, two boots of a Debian
# guest), counts as five; the flashcache smoke test (one boot, 15 short runs) as three.
mapfile -t order < <(for i in "${!boots[@]}"; do
    if [[ ${boots[$i]} == systemd@* ]]; then echo "5 $i"
    elif [[ ${boots[$i]} == flashcache@* ]]; then echo "3 $i"
    else echo "$(wc -w <<<"${boots[$i]}") $i"; fi
done | sort -s -k1,1nr | cut -d' ' -f2)
set -m  # each boot in a process group of its own, stopped whole on exit
declare -A running=()
stop_boots() { local p; for p in "${!running[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done; }
trap 'stop_boots; cleanup; rm -rf "$OUT"' EXIT
failed=() times=() next=0 T_ALL=$SECONDS
while [[ $next -lt ${#order[@]} || ${#running[@]} -gt 0 ]]; do
    while [[ ${#running[@]} -lt $JOBS && $next -lt ${#order[@]} ]]; do
        i=${order[$next]}; next=$((next + 1))
        case ${boots[$i]} in
            systemd@*) run_systemd "$i" & ;;
            flashcache@*) run_flashcache "$i" & ;;
            *) run_boot "$i" & ;;
        esac
        running[$!]=$i
        echo "[tests] boot $((i + 1)) of ${#boots[@]} started: ${boots[$i]}"
    done
    done_pid=
    wait -n -p done_pid "${!running[@]}" || true
    [[ -n $done_pid && -n ${running[$done_pid]:-} ]] || continue
    i=${running[$done_pid]}; unset "running[$done_pid]"
    cat "$OUT/$i.out"
    # A boot whose run_boot was itself stopped leaves no complete results: that is a failure too.
    if ! grep -qs '^time \[boot' "$OUT/$i.res"; then failed+=("${boots[$i]// /,}(the boot ended without its results)"); fi
    [[ -f $OUT/$i.res ]] && while read -r kind rest; do
        if [[ $kind == fail ]]; then failed+=("$rest"); else times+=("$rest"); fi
    done <"$OUT/$i.res"
done
set +m
times+=("[all boots $((SECONDS - T_ALL))s, $JOBS at a time]")
echo "[tests] time per suite: ${times[*]}"
if [[ ${#failed[@]} -gt 0 ]]; then echo "[tests] FAILED suites: ${failed[*]}"; exit 1; fi
echo "[tests] all VM suites passed: ${SUITES[*]}"
