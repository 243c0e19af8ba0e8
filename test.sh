#!/usr/bin/env bash
# Runs every test: host unit tests (`swift test`), then the end-to-end suites on
# the real ublk driver inside a qemu VM (tests/vm.sh). Installs what it needs.
#   ./test.sh            everything
#   ./test.sh --host     host tests only (no VM)
#   ./test.sh --vm [SUITE...]   VM suites only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/deps.sh
mode=all
case "${1:-}" in --host) mode=host; shift ;; --vm) mode=vm; shift ;; esac
rc=0
if [[ $mode != vm ]]; then
    echo "== host tests (swift test)"
    swift test 2>&1 | tee /tmp/ublk-http-swift-test.log | grep -vE "^Test Case .* (started|passed)" || rc=1
    echo "== host tests of prefetch/status (nginx, moto S3)"
    tests/host/cli.sh .build/debug/ublk-http || rc=1
fi
if [[ $mode != host ]]; then
    echo "== VM tests on the real ublk driver"
    tests/vm.sh "$@" || rc=1
fi
if [[ $rc -eq 0 ]]; then echo "== all tests passed"; else echo "== SOME TESTS FAILED"; fi
exit $rc
