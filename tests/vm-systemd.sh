#!/usr/bin/env bash
# Usage: tests/vm-systemd.sh [--deb FILE]
#   The host service's suite (tests/vm-systemd/service.sh) in the Debian guest
#   with systemd as PID 1 (vm/run-systemd.sh, rootfs from vm/rootfs.sh, the 7.x
#   kernel): builds the .deb (scripts/build-deb.sh) unless one is given, installs
#   it in the guest's first boot, reboots once. Exits with the suite's status.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEB=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --deb) DEB="$2"; shift 2 ;;
        *) echo "usage: tests/vm-systemd.sh [--deb FILE]" >&2; exit 2 ;;
    esac
done
if [[ -z "$DEB" ]]; then
    out="$(mktemp -d /tmp/ublk-http-deb.XXXXXX)"
    DEB="$(scripts/build-deb.sh --out "$out")"
fi
# The guest has no network: its rootfs carries the package's dependencies.
deps="$(dpkg-deb -f "$DEB" Depends | tr ',' '\n' | sed 's/(.*)//; s/|.*//; s/ //g' | grep -v '^$' | sort -u | tr '\n' ' ')"
export UBLK_VM_ROOTFS_EXTRA="${UBLK_VM_ROOTFS_EXTRA:-} $deps"
exec vm/run-systemd.sh --timeout 1200 --deb "$DEB" --file tests/vm/lib.sh:/opt/ublk-test/lib.sh tests/vm-systemd/service.sh
