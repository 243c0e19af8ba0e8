#!/usr/bin/env bash
# The demo: builds ublk-http, makes the built-in sample ext4 image, serves it
# over HTTP with nginx on 127.0.0.1, attaches it with the http target (fetched
# on demand), mounts it read-only, lists and verifies its files and prints the
# cache statistics. Runs natively where the kernel has ublk_drv (modprobe
# ublk_drv), otherwise inside a qemu VM with Debian's newest 7.x kernel.
#   ./demo.sh          natively if possible, else in the VM
#   ./demo.sh --vm     always in the VM
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/deps.sh
BIN=$(tests/build-static.sh)
WORK=$(mktemp -d /tmp/ublk-http-demo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
demo/sample-image.sh "$WORK/sample.img"
native=0
if [[ "${1:-}" != --vm && $(id -u) -eq 0 ]]; then
    [[ -e /dev/ublk-control ]] || modprobe ublk_drv 2>/dev/null || true
    [[ -e /dev/ublk-control ]] && native=1
fi
if [[ $native == 1 ]]; then
    echo "== running natively (this kernel has ublk_drv)"
    mkdir -p "$WORK/www" "$WORK/tmp" && mv "$WORK/sample.img" "$WORK/www/"
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat > "$WORK/nginx.conf" <<CONF
user root; daemon on; worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/error.log;
events { worker_connections 64; }
http { access_log $WORK/access.log; client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp;
  fastcgi_temp_path $WORK/tmp; uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  server { listen 127.0.0.1:$PORT; root $WORK/www; } }
CONF
    /usr/sbin/nginx -c "$WORK/nginx.conf"
    trap 'kill $(cat "$WORK/nginx.pid") 2>/dev/null; rm -rf "$WORK"' EXIT
    demo/steps.sh "http://127.0.0.1:$PORT/sample.img" "$BIN"
else
    echo "== this kernel has no ublk driver: running the demo inside a qemu VM (Debian's Linux 7.x)"
    INITRD=${UBLK_VM_CACHE:-/var/cache/ublk-http-vm}/initramfs-demo.cpio.gz
    vm/initramfs.sh "$INITRD" --bin "$BIN:/usr/local/bin/ublk-http" >/dev/null
    vm/run.sh --initrd "$INITRD" --timeout 600 --file "$WORK/sample.img:/demo/sample.img" \
        --file "$PWD/demo/steps.sh:/demo/steps.sh" demo/vm-main.sh 2>&1 \
        | grep -vE '^\[ *[0-9]+\.[0-9]+\]|^@@'
fi
