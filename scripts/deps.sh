#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian 12, as root.
# Idempotent: `apt-get update` and `apt-get install` only run when something is missing.
set -euo pipefail
PKGS=(liburing-dev libcurl4-openssl-dev pkg-config qemu-system-x86 busybox-static fio nginx-light curl
      cpio xz-utils gzip e2fsprogs util-linux jq python3 gnuplot-nox dmsetup cryptsetup-bin openssl)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ $(id -u) -eq 0 ]] || { echo "deps.sh: need root to install: ${missing[*]}" >&2; exit 1; }
    echo "[deps] installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    while pgrep -x apt-get >/dev/null || pgrep -x dpkg >/dev/null; do sleep 3; done
    apt-get update -q >/tmp/ublk-http-apt.log 2>&1 \
        && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >>/tmp/ublk-http-apt.log 2>&1 \
        || { tail -n 40 /tmp/ublk-http-apt.log >&2; echo "deps.sh: apt-get failed" >&2; exit 1; }
fi
if ! command -v swift >/dev/null; then
    for d in /opt/swift/usr/bin /usr/share/swift/usr/bin; do [[ -x $d/swift ]] && export PATH="$d:$PATH"; done
    command -v swift >/dev/null || { echo "deps.sh: no Swift toolchain found (need Swift 6; https://swift.org/install)" >&2; exit 1; }
fi
