#!/usr/bin/env bash
# Builds the release binary with the Swift runtime linked in statically (it then
# needs only libc, liburing and libcurl at run time: the same file runs in the
# test VM and on any machine with ublk_drv) and prints its path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
swift build -c release --static-swift-stdlib --scratch-path .build-static --product ublk-http >&2
echo "$PWD/.build-static/release/ublk-http"
