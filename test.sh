#!/usr/bin/env bash
# Runs every test: host unit tests (`swift test`), then the end-to-end suites on
# the real ublk driver inside a qemu VM (tests/vm.sh). Installs what it needs.
#   ./test.sh            everything
#   ./test.sh --host     host tests only (no VM)
#   ./test.sh --vm [SUITE...]   VM suites only
# The VM part includes the host service (tests/vm.sh's suite `systemd`: the
# Debian package, checked and lintian-clean, in a Debian guest with systemd as
# PID 1). With no SUITE named, it ends with the flashcache benchmark's smoke
# test (bench/run.sh --suite flashcache --quick: every cache set up, every
# case run; it fails when one does not).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/deps.sh
mode=all
case "${1:-}" in --host) mode=host; shift ;; --vm) mode=vm; shift ;; esac
rc=0
if [[ $mode != vm ]]; then
    echo "== host tests (swift test)"
    # The crash/fault model test is a third of the run and touches no shared
    # state: it runs beside the others, on the machine's second core.
    quiet() { grep -vE "^Test Case .* (started|passed)"; }
    if swift build --build-tests 2>&1 | tee /tmp/ublk-http-swift-build.log | tail -n 3; then
        swift test --skip-build --filter PageStateModelTests >/tmp/ublk-http-swift-test-model.log 2>&1 &
        model=$!
        swift test --skip-build --skip PageStateModelTests 2>&1 | tee /tmp/ublk-http-swift-test.log | quiet || rc=1
        wait $model || rc=1
        quiet </tmp/ublk-http-swift-test-model.log
    else
        cat /tmp/ublk-http-swift-build.log; rc=1
    fi
    echo "== host tests of prefetch/status (nginx, moto S3)"
    tests/host/cli.sh .build/debug/ublk-http || rc=1
fi
if [[ $mode != host ]]; then
    echo "== VM tests on the real ublk driver"
    # (with no suite named: every suite, the systemd guest's and the flashcache benchmark's smoke test too)
    tests/vm.sh "$@" || rc=1
fi
if [[ $rc -eq 0 ]]; then echo "== all tests passed"; else echo "== SOME TESTS FAILED"; fi
exit $rc
