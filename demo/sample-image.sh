#!/usr/bin/env bash
# Usage: demo/sample-image.sh OUT.img
#   Builds the built-in sample disk image: a 64 MiB ext4 file system holding a
#   few text files and some binary data, made with `mkfs.ext4 -d` (no mount).
set -euo pipefail
OUT=$1
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
mkdir -p "$src/docs" "$src/data"
cat > "$src/README.txt" <<'TXT'
This file system lives in a disk image that ublk-http attached as a block device.
Only the blocks that were read have been fetched.
TXT
for i in $(seq 1 5); do seq 1 $((i * 2000)) > "$src/docs/numbers-$i.txt"; done
head -c $((8 << 20)) /dev/urandom > "$src/data/random.bin"
(cd "$src" && find . -type f | sort | xargs sha256sum) > "$src.sums" && mv "$src.sums" "$src/SHA256SUMS"
rm -f "$OUT"
truncate -s 64M "$OUT"
mkfs.ext4 -q -F -L ublk-demo -d "$src" "$OUT"
