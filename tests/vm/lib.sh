# Guest-side test helpers (bash), sourced by the suites in tests/vm/.
# Each check prints "ok - NAME" or "not ok - NAME" plus what went wrong; `finish`
# prints the closing line "N passed, M failed" and exits non-zero on failure.
set -u
PASS=0 FAIL=0 FAILED_NAMES=()
UBLK=${UBLK:-/usr/local/bin/ublk-http}

ok()   { PASS=$((PASS + 1)); echo "ok - $1"; }
fail() { FAIL=$((FAIL + 1)); FAILED_NAMES+=("$1"); echo "not ok - $1"; shift; [ $# -gt 0 ] && echo "    $*"; return 0; }

# check NAME CMD...: passes when CMD exits 0.
check() {
    local name=$1; shift
    local out
    if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "command: $* => $(echo "$out" | tail -n 5)"; fi
}

# expect_error NAME PATTERN CMD...: CMD must exit non-zero, print exactly one line
# on stderr matching PATTERN, and nothing on stdout.
expect_error() {
    local name=$1 pattern=$2; shift 2
    local out err rc
    out=$(timeout 30 "$@" 2>/tmp/.err); rc=$?
    err=$(cat /tmp/.err)
    if [ $rc -eq 0 ]; then fail "$name" "exit 0, expected an error"; return; fi
    if [ $rc -ge 124 ]; then fail "$name" "exit $rc (timeout or crash): $err"; return; fi
    if [ -n "$out" ]; then fail "$name" "stdout not empty: $out"; return; fi
    if [ "$(printf '%s\n' "$err" | wc -l)" -ne 1 ]; then fail "$name" "stderr is not one line: $err"; return; fi
    if ! printf '%s' "$err" | grep -qE -- "$pattern"; then fail "$name" "stderr '$err' does not match /$pattern/"; return; fi
    ok "$name"
}

# eq NAME EXPECTED ACTUAL
eq() { if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "expected '$2', got '$3'"; fi; }

# wait_for SECONDS CMD...: polls CMD every 0.1 s.
wait_for() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.1
    done
}

gone() { [ ! -e "$1" ]; }
alive() { kill -0 "$1" 2>/dev/null; }
dead() { ! kill -0 "$1" 2>/dev/null || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# add ARGS...: runs `ublk-http add`, stores its JSON in $DEV_JSON and its fields
# in DEV_ID, DEV_B (block device), DEV_PID.
add() {
    DEV_JSON=$(timeout 60 "$UBLK" add "$@") || {
        echo "add $* failed: $DEV_JSON" >&2
        tail -n 30 /run/ublk-http/server.log >&2 2>/dev/null
        return 1
    }
    # One jq, not three: a jq start costs about 0.25 s under TCG.
    read -r DEV_ID DEV_B DEV_PID < <(echo "$DEV_JSON" | jq -r '"\(.dev_id) \(.block_device) \(.pid)"')
}

del() { timeout 60 "$UBLK" del -n "$1"; }

# Each section prints the guest's uptime: where a suite's time goes.
section() { echo; echo "# $* [$(cut -d' ' -f1 /proc/uptime) s]"; }

finish() {
    echo
    if [ "$FAIL" -gt 0 ]; then echo "failed: ${FAILED_NAMES[*]}"; fi
    echo "$PASS passed, $FAIL failed"
    [ "$FAIL" -eq 0 ]
}
