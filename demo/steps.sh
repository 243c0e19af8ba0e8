#!/usr/bin/env bash
# Usage: demo/steps.sh IMAGE [UBLK-HTTP]
#   The demo itself (natively or inside the VM): attach IMAGE as a read-only
#   ublk device, mount it, list it, verify it, show the device and its
#   statistics, and clean up.
set -euo pipefail
IMG=$1; UBLK=${2:-ublk-http}
MNT=$(mktemp -d /tmp/ublk-demo.XXXXXX)
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
say "ublk-http add -t loop -f $IMG --read-only"
JSON=$("$UBLK" add -t loop -f "$IMG" --read-only)
echo "$JSON"
ID=$(echo "$JSON" | sed -n 's/.*"dev_id":\([0-9]*\).*/\1/p')
DEV=/dev/ublkb$ID
cleanup() { umount "$MNT" 2>/dev/null || true; "$UBLK" del -n "$ID" 2>/dev/null || true; rmdir "$MNT" 2>/dev/null || true; }
trap cleanup EXIT
say "mount -o ro $DEV $MNT"
mount -t ext4 -o ro "$DEV" "$MNT"
say "ls -lR $MNT"
ls -lR "$MNT"
say "cat $MNT/README.txt"
cat "$MNT/README.txt"
say "(cd $MNT && sha256sum -c SHA256SUMS)"
(cd "$MNT" && sha256sum -c SHA256SUMS)
say "ublk-http list"
"$UBLK" list
say "umount $MNT && ublk-http del -n $ID"
umount "$MNT"
"$UBLK" del -n "$ID"
trap - EXIT
rmdir "$MNT"
echo
echo "demo finished: /dev/ublkb$ID is gone"
