#!/usr/bin/env bash
# Usage: demo/steps.sh URL [UBLK-HTTP]
#   The demo itself (natively or inside the VM): attach the disk image at URL
#   with the http target, mount it read-only, list and verify its files, show
#   the device and its cache statistics, detach, attach again (nothing is
#   fetched twice), and clean up.
set -euo pipefail
URL=$1; UBLK=${2:-ublk-http}
MNT=$(mktemp -d /tmp/ublk-demo.XXXXXX)
CACHE=$(mktemp -d /tmp/ublk-demo-cache.XXXXXX)
ID=""
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
cleanup() {
    umount "$MNT" 2>/dev/null || true
    [[ -n "$ID" ]] && "$UBLK" del -n "$ID" 2>/dev/null || true
    rmdir "$MNT" 2>/dev/null || true
    rm -rf "$CACHE"
}
trap cleanup EXIT
attach() {
    say "ublk-http add -t http --url $URL --cache $CACHE/sample.cache --bitmap $CACHE/sample.bitmap"
    JSON=$("$UBLK" add -t http --url "$URL" --cache "$CACHE/sample.cache" --bitmap "$CACHE/sample.bitmap")
    echo "$JSON"
    ID=$(echo "$JSON" | sed -n 's/.*"dev_id":\([0-9]*\).*/\1/p')
    DEV=/dev/ublkb$ID
}
attach
say "mount -o ro $DEV $MNT"
mount -t ext4 -o ro "$DEV" "$MNT"
say "ls -lR $MNT"
ls -lR "$MNT"
say "cat $MNT/README.txt"
cat "$MNT/README.txt"
say "(cd $MNT && sha256sum -c SHA256SUMS)"
(cd "$MNT" && sha256sum -c SHA256SUMS)
sleep 1.2  # statistics are published once a second
say "ublk-http list"
"$UBLK" list
say "ublk-http stats -n $ID"
"$UBLK" stats -n "$ID"
say "ublk-http status --bitmap $CACHE/sample.bitmap   # what the cache holds"
umount "$MNT"
"$UBLK" del -n "$ID"; ID=""
"$UBLK" status --bitmap "$CACHE/sample.bitmap" --cache "$CACHE/sample.cache"
echo
echo "# Attach again: the cache is reused, the same reads fetch nothing."
attach
mount -t ext4 -o ro "$DEV" "$MNT"
(cd "$MNT" && sha256sum -c --quiet SHA256SUMS && echo "all files verified")
sleep 1.2
say "ublk-http stats -n $ID --json"
"$UBLK" stats -n "$ID" --json
umount "$MNT"
"$UBLK" del -n "$ID"; ID=""
echo
echo "demo finished: the device is gone"
