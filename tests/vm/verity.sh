# On the real driver: dm-verity verification of the http target. Every page
# fetched, or found in a reused cache, is checked against the image's hash
# tree (`veritysetup format`, run here in the guest) before it is kept or
# returned: a page that does not match is never returned nor kept, the read
# fails with EIO, `stats` counts it. `verify` scrubs the cache. The kernel's
# own dm-verity, on the same image and tree, reads the same bytes.
source /tests/lib.sh
set -o pipefail
export DM_DISABLE_UDEV=1   # no udev in the guest: libdevmapper makes the nodes itself
VS=$(command -v veritysetup)
check "dm_verity and loop loaded" bash -c "kmod-load dm_mod && kmod-load dm_verity && kmod-load loop"

WWW=/srv/www; C=/var/tmp/verity; T=/var/tmp/trees
mkdir -p $WWW $C $T /mnt/v
SZ=$((32 << 20)); PAGES=$((SZ / 4096))
H=http://127.0.0.1:8080

# flip FILE OFFSET: inverts the byte at OFFSET, in place.
flip() {
    local b; b=$(od -A n -t u1 -j "$2" -N 1 "$1" | tr -d ' ')
    printf "\\$(printf %03o $((b ^ 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc,fsync status=none
}
# page FILE N: 4 KiB page N of FILE on stdout.
page() { dd if="$1" bs=4k skip="$2" count=1 status=none; }
# root_of: the root hash in veritysetup format's output (stdin).
root_of() { sed -n 's/^Root hash:[[:space:]]*//p'; }
# vstat FIELD: a field of the device's stats (published once a second).
vstat() { "$UBLK" stats -n $DEV_ID --json | jq -r ".$1"; }
# read_fails DEV BLOCK: a direct read of the 4 KiB block fails with EIO (not a hang, not a crash).
read_fails() {
    local rc
    timeout 60 dd if="$1" of=/tmp/rf bs=4k skip="$2" count=1 iflag=direct 2>/tmp/rf.err; rc=$?
    [ $rc -ne 0 ] && [ $rc -lt 124 ] && grep -q "Input/output error" /tmp/rf.err
}
# same_blocks DEV FILE FIRST COUNT: 4 KiB blocks [FIRST, FIRST+COUNT) of DEV (direct) and FILE are equal.
same_blocks() {
    cmp <(dd if="$1" bs=4k skip="$3" count="$4" iflag=direct status=none) <(dd if="$2" bs=4k skip="$3" count="$4" status=none)
}
no_devices() { [ "$("$UBLK" list | jq length)" = 0 ]; }
# one_flip FILE N: page N of FILE differs from the image's in exactly one byte.
one_flip() { [ "$(cmp -l <(page "$1" "$2") <(page $WWW/disk.img "$2") 2>/dev/null | wc -l)" = 1 ]; }
# add knows the verity options (else every refusal below would pass for the wrong reason).
# (grep reads all of it: with pipefail, `grep -q` stopping early fails the pipe on SIGPIPE.)
has_verity() { "$UBLK" add --help 2>&1 | grep -c -- --verity-root >/dev/null; }
# refused NAME PATTERN ARGS...: `add -t http ARGS` fails with one line matching PATTERN.
refused() {
    local name=$1 pattern=$2; shift 2
    if has_verity; then expect_error "$name" "$pattern" "$UBLK" add -t http "$@"
    else fail "$name" "ublk-http add has no --verity-root"; fi
}

section "an ext4 image and its hash trees, made by veritysetup in the guest"
src=$(mktemp -d)
mkdir -p $src/d
for i in 1 2 3 4 5; do head -c $(( i * 900000 + 4096 * i + 3 )) /dev/urandom > $src/d/blob$i; done
seq 1 50000 > $src/numbers.txt
(cd $src && sha256sum d/* numbers.txt) > /tmp/sums
truncate -s $SZ $WWW/disk.img
check "mkfs.ext4 -d (32 MiB)" mkfs.ext4 -q -F -d $src $WWW/disk.img
# The tree beside the image (served and local), with its superblock.
$VS format $WWW/disk.img $WWW/disk.tree > /tmp/fmt.out 2>&1 || fail "veritysetup format" "$(cat /tmp/fmt.out)"
ROOT=$(root_of < /tmp/fmt.out)
check "the root hash is 64 hex digits" grep -qE '^[0-9a-f]{64}$' <<<"$ROOT"
cp $WWW/disk.tree $T/disk.tree
# The tree appended to a copy of the image, at the data's end.
cp $WWW/disk.img $WWW/app.img
APPROOT=$($VS format $WWW/app.img $WWW/app.img --data-blocks $PAGES --hash-offset $SZ | root_of)
check "veritysetup format IMG IMG --hash-offset (the tree appended)" grep -qE '^[0-9a-f]{64}$' <<<"$APPROOT"
check "the appended image is the data, then the tree" bash -c "cmp -n $SZ $WWW/app.img $WWW/disk.img && [ \$(stat -c %s $WWW/app.img) -gt $SZ ]"
APPSALT=$($VS dump $WWW/app.img --hash-offset $SZ | sed -n 's/^Salt:[[:space:]]*//p')
# Other block sizes.
HB1K=$($VS format --hash-block-size 1024 $WWW/disk.img $T/hb1k.tree | root_of)
# A tree file whose superblock is 8 KiB in (--hash-offset of a separate hash file).
OFFROOT=$($VS format --hash-offset 8192 $WWW/disk.img $T/off.tree | root_of)
DB1K=$($VS format --data-block-size 1024 --hash-block-size 1024 $WWW/disk.img $T/db1k.tree | root_of)
# Wrong ones: another image's root; a truncated tree; a tree of half the image.
head -c $SZ /dev/urandom > /tmp/other.img
OTHERROOT=$($VS format /tmp/other.img $T/other.tree | root_of)
head -c $(( $(stat -c %s $T/disk.tree) - 4096 )) $T/disk.tree > $T/trunc.tree
head -c 8192 $T/disk.tree > $T/short.tree
HALFROOT=$($VS format --data-blocks $((PAGES / 2)) $WWW/disk.img $T/half.tree | root_of)
check "every root hash made" test -n "$HB1K" -a -n "$DB1K" -a -n "$OTHERROOT" -a -n "$HALFROOT" -a -n "$APPSALT" -a -n "$OFFROOT"
# One flipped byte in block K, served as its own image.
K=3001
cp $WWW/disk.img $WWW/bad.img
flip $WWW/bad.img $((K * 4096 + 1234))
check "bad.img differs from the image in block $K alone" bash -c "
    [ \"\$(cmp -l $WWW/bad.img $WWW/disk.img | wc -l)\" = 1 ] && ! cmp -s <(dd if=$WWW/bad.img bs=4k skip=$K count=1 status=none) <(dd if=$WWW/disk.img bs=4k skip=$K count=1 status=none)"
check "nginx" nginx-start $WWW 8080

section "the kernel's dm-verity on the image and its tree: the same bytes (veritysetup open)"
check "veritysetup verify" $VS verify $WWW/disk.img $WWW/disk.tree $ROOT
check "veritysetup open (loop devices)" $VS open $WWW/disk.img vdisk $WWW/disk.tree $ROOT
check "/dev/mapper/vdisk reads as the image" cmp /dev/mapper/vdisk $WWW/disk.img
check "veritysetup open, bad.img" $VS open $WWW/bad.img vbad $WWW/disk.tree $ROOT
check "the kernel fails block $K of bad.img with EIO" read_fails /dev/mapper/vbad $K
check "and reads the blocks around it" bash -c "$(declare -f same_blocks); same_blocks /dev/mapper/vbad $WWW/disk.img 0 $K && same_blocks /dev/mapper/vbad $WWW/disk.img $((K + 1)) $((PAGES - K - 1))"
# The appended image through a verity table of dmsetup's own (no veritysetup).
LOOP=$(/usr/sbin/losetup -f --show -r $WWW/app.img)
# data blocks, then the hash start in hash blocks: the superblock's block at SZ, the tree after it.
check "dmsetup create vapp (verity table, the tree appended)" bash -c "dmsetup --noudevsync create vapp --readonly \
    --table '0 $((SZ / 512)) verity 1 $LOOP $LOOP 4096 4096 $PAGES $((SZ / 4096 + 1)) sha256 $APPROOT $APPSALT' && dmsetup mknodes vapp"
check "/dev/mapper/vapp reads as the image" cmp /dev/mapper/vapp $WWW/disk.img

section "--verity-tree URL: the device reads whole and right, nothing fails"
OPTS="--url $H/disk.img --cache $C/a.cache --bitmap $C/a.bitmap --verity-root $ROOT"
if add -t http $OPTS --verity-tree $H/disk.tree; then
    eq "the device is the image's size" $SZ "$(blockdev --getsize64 $DEV_B)"
    check "cmp of the whole device against the image" cmp $DEV_B $WWW/disk.img
    check "mount -o ro and every file's checksum" bash -c "mount -t ext4 -o ro $DEV_B /mnt/v && cd /mnt/v && sha256sum -c /tmp/sums && cd / && umount /mnt/v"
    check "the kernel's dm-verity reads the same bytes" cmp /dev/mapper/vdisk $DEV_B
    sleep 1.5
    eq "verify_failures 0" 0 "$(vstat verify_failures)"
    check "pages_verified: every page ($PAGES)" test "$(vstat pages_verified)" -ge $PAGES
    check "del" del $DEV_ID
else
    fail "add --verity-root --verity-tree URL" "$DEV_JSON"
fi

section "the tree URL is fetched on demand: a small read fetches a few hash blocks, not the tree"
TREE_BYTES=$(stat -c %s $WWW/disk.tree)
if add -t http --url $H/disk.img --cache $C/od.cache --bitmap $C/od.bitmap --verity-root $ROOT --verity-tree $H/disk.tree; then
    # The image's last 64 KiB: no hash block after it to read ahead.
    check "read the last 64 KiB" same_blocks $DEV_B $WWW/disk.img $((PAGES - 16)) 16
    ALLOC=$(( $(stat -c %b $C/od.cache.verity) * 512 ))
    echo "# tree $TREE_BYTES bytes; its copy holds $ALLOC bytes after the read"
    # add's partition scan read the first and last pages: their hash blocks, and 8 MiB's after the first, came too.
    check "the copy holds at most half the tree ($ALLOC of $TREE_BYTES bytes)" test $((2 * ALLOC)) -le $TREE_BYTES
    check "cmp of the whole device against the image" cmp $DEV_B $WWW/disk.img
    check "the copy now holds the whole tree" cmp $C/od.cache.verity $WWW/disk.tree
    # The server stops on SIGTERM and the device goes at once (del waits 20 s, then kills it).
    t0=$(date +%s); check "del" del $DEV_ID; t1=$(date +%s)
    check "del took $((t1 - t0)) s: the server stopped by itself" test $((t1 - t0)) -lt 10
else
    fail "add --verity-tree URL (on demand)" "$DEV_JSON"
fi

section "--verity-tree PATH (a local tree)"
if add -t http --url $H/disk.img --cache $C/l.cache --bitmap $C/l.bitmap --verity-root $ROOT --verity-tree $T/disk.tree; then
    check "cmp of the whole device against the image" cmp $DEV_B $WWW/disk.img
    sleep 1.5
    eq "verify_failures 0" 0 "$(vstat verify_failures)"
    check "del" del $DEV_ID
else
    fail "add --verity-tree PATH" "$DEV_JSON"
fi

section "the tree appended to the image (--verity-offset): the device is the data part"
if add -t http --url $H/app.img --cache $C/p.cache --bitmap $C/p.bitmap --verity-root $APPROOT --verity-offset $SZ; then
    eq "the device's size is the data blocks'" $SZ "$(blockdev --getsize64 $DEV_B)"
    check "cmp of the whole device against the data" cmp $DEV_B $WWW/disk.img
    check "the kernel's dm-verity (dmsetup table) reads the same bytes" cmp /dev/mapper/vapp $DEV_B
    sleep 1.5
    eq "verify_failures 0" 0 "$(vstat verify_failures)"
    check "del" del $DEV_ID
else
    fail "add --verity-offset" "$DEV_JSON"
fi

section "a tree of 1024-byte hash blocks"
if add -t http --url $H/disk.img --cache $C/h.cache --bitmap $C/h.bitmap --verity-root $HB1K --verity-tree $T/hb1k.tree; then
    check "cmp of the whole device against the image" cmp $DEV_B $WWW/disk.img
    sleep 1.5
    eq "verify_failures 0" 0 "$(vstat verify_failures)"
    check "del" del $DEV_ID
else
    fail "add with a --hash-block-size 1024 tree" "$DEV_JSON"
fi

section "a tree file with its superblock 8 KiB in (--verity-tree PATH --verity-offset 8192)"
if add -t http --url $H/disk.img --cache $C/o.cache --bitmap $C/o.bitmap --verity-root $OFFROOT --verity-tree $T/off.tree --verity-offset 8192; then
    eq "the device is the image's size" $SZ "$(blockdev --getsize64 $DEV_B)"
    check "cmp of the whole device against the image" cmp $DEV_B $WWW/disk.img
    check "del" del $DEV_ID
else
    fail "add --verity-tree PATH --verity-offset" "$DEV_JSON"
fi

section "a tree of 1024-byte data blocks: read right, or refused at add with one line"
out=$(timeout 60 "$UBLK" add -t http --url $H/disk.img --cache $C/d.cache --bitmap $C/d.bitmap \
    --verity-root $DB1K --verity-tree $T/db1k.tree 2>/tmp/db1k.err); rc=$?
if [ $rc -eq 0 ]; then
    read -r DEV_ID DEV_B < <(echo "$out" | jq -r '"\(.dev_id) \(.block_device)"')
    echo "# accepted"
    check "cmp of the whole device against the image" cmp $DEV_B $WWW/disk.img
    check "del" del $DEV_ID
else
    echo "# refused: $(cat /tmp/db1k.err)"
    check "refused with one line on stderr, nothing on stdout" test $rc -lt 124 -a -z "$out" -a "$(wc -l < /tmp/db1k.err)" = 1
    check "and not for an unknown option" has_verity
fi

section "one flipped byte on the server: that block fails with EIO, the rest reads right, nothing bad is kept"
if add -t http --url $H/bad.img --cache $C/b.cache --bitmap $C/b.bitmap --verity-root $ROOT --verity-tree $H/disk.tree; then
    check "reading block $K fails with EIO" read_fails $DEV_B $K
    check "blocks 0 to $((K - 1)) read right" same_blocks $DEV_B $WWW/disk.img 0 $K
    check "blocks $((K + 1)) to the end read right" same_blocks $DEV_B $WWW/disk.img $((K + 1)) $((PAGES - K - 1))
    check "block $K fails again (its bad bytes were not kept)" read_fails $DEV_B $K
    check "a buffered read of the whole device fails too, and not with other bytes" bash -c "
        ! timeout 120 dd if=$DEV_B of=/tmp/all bs=1M 2>/dev/null; [ \$(stat -c %s /tmp/all) -le $((K * 4096)) ] && cmp -n \$(stat -c %s /tmp/all) /tmp/all $WWW/disk.img"
    check "the server is alive" alive $DEV_PID
    sleep 1.5
    F=$(vstat verify_failures)
    echo "# verify_failures $F, pages_verified $(vstat pages_verified)"
    check "verify_failures >= 1" test "$F" -ge 1
    # Each read of block $K costs two fetches of it; sequential readers short of it
    # (readahead) do not fetch it at every step (it was 624 before readahead stopped there).
    check "verify_failures: a few per read of block $K, not one per sequential step ($F)" test "$F" -le 40
    check "del" del $DEV_ID
    check "the cache file does not hold the flipped block" bash -c "$(declare -f page); [ \$(page $C/b.cache $K | wc -c) = 4096 ] && ! cmp -s <(page $C/b.cache $K) <(page $WWW/bad.img $K)"
    S=$("$UBLK" status --bitmap $C/b.bitmap --cache $C/b.cache)
    eq "every page but block $K is cached" "$((PAGES - 1))/$PAGES" "$(echo "$S" | jq -r '"\(.pages_present)/\(.pages_total)"')"
else
    fail "add of bad.img" "$DEV_JSON"
fi

section "a reused cache edited while the device was down: the edited pages are dropped and fetched again"
# a.cache holds every page (read whole above). Edit three of them, the last page one.
E1=7; E2=4000; E3=$((PAGES - 1))
for p in $E1 $E2 $E3; do flip $C/a.cache $((p * 4096 + 99)); done
check "the cache file now differs from the image in 3 pages, one byte each" bash -c "WWW=$WWW; $(declare -f page one_flip); one_flip $C/a.cache $E1 && one_flip $C/a.cache $E2 && one_flip $C/a.cache $E3"
if add -t http $OPTS --verity-tree $H/disk.tree; then
    eq "cache state reused" reused "$(echo "$DEV_JSON" | jq -r .target_options.cache_state)"
    check "cmp of the whole device against the image" cmp $DEV_B $WWW/disk.img
    sleep 1.5
    eq "verify_failures counts the 3 edited pages" 3 "$(vstat verify_failures)"
    check "pages_verified: every page again" test "$(vstat pages_verified)" -ge $PAGES
    check "the cache file holds the right bytes again" bash -c "$(declare -f page); for p in $E1 $E2 $E3; do cmp <(page $C/a.cache \$p) <(page $WWW/disk.img \$p) || exit 1; done"

    section "verify: a page edited behind the server's back is found, dropped and fetched again"
    Q=5555
    flip $C/a.cache $((Q * 4096 + 7))
    timeout 300 "$UBLK" verify -n $DEV_ID --json > /tmp/v1.json 2>/tmp/v1.err; rc=$?
    echo "# verify: exit $rc, $(wc -l < /tmp/v1.json) lines, last: $(tail -n 1 /tmp/v1.json) $(cat /tmp/v1.err)"
    eq "verify exits 1 (a page was dropped)" 1 $rc
    check "every line is JSON with a state" jq -se 'length > 0 and all(.[]; .state == "running" or .state == "done")' /tmp/v1.json
    L=$(tail -n 1 /tmp/v1.json)
    eq "the last line: done" done "$(echo "$L" | jq -r .state)"
    eq "pages_dropped 1" 1 "$(echo "$L" | jq -r .pages_dropped)"
    eq "pages_checked: every page" "$PAGES/$PAGES" "$(echo "$L" | jq -r '"\(.pages_checked)/\(.pages_total)"')"
    check "cmp of the whole device against the image (the dropped page fetched again)" cmp $DEV_B $WWW/disk.img
    check "the cache file holds the right page again" bash -c "$(declare -f page); cmp <(page $C/a.cache $Q) <(page $WWW/disk.img $Q)"
    # stdout not a terminal: JSON lines without --json.
    "$UBLK" verify -n $DEV_ID > /tmp/v2.json 2>/tmp/v2.err; rc=$?
    eq "a second verify exits 0" 0 $rc
    eq "and drops nothing" "done 0" "$(tail -n 1 /tmp/v2.json | jq -r '"\(.state) \(.pages_dropped)"')"
    check "the kernel's dm-verity reads the same bytes" cmp /dev/mapper/vdisk $DEV_B
    check "del" del $DEV_ID
else
    fail "add again with the edited cache" "$DEV_JSON"
fi
section "two queues (-q 2): a reused page is checked whichever queue reads it first"
E4=100; E5=6000
for p in $E4 $E5; do flip $C/a.cache $((p * 4096 + 5)); done
if add -t http $OPTS --verity-tree $H/disk.tree -q 2; then
    eq "two queues" 2 "$(echo "$DEV_JSON" | jq -r .queues)"
    # Reads from vCPU 1 reach queue 1 (a peer), which hands unchecked pages to the home.
    check "cmp of the whole device from vCPU 1" taskset -c 1 cmp $DEV_B $WWW/disk.img
    check "and from vCPU 0" taskset -c 0 cmp $DEV_B $WWW/disk.img
    sleep 1.5
    eq "verify_failures counts the 2 edited pages" 2 "$(vstat verify_failures)"
    check "del" del $DEV_ID
else
    fail "add -q 2 with the edited cache" "$DEV_JSON"
fi

expect_error "verify of a missing device: one line" "ublk77|no such device" "$UBLK" verify -n 77
"$UBLK" verify -n 77 >/dev/null 2>&1; rc=$?
check "and an exit status other than 0 and 1 (those say what a scrub found)" test $rc -gt 1 -a $rc -lt 124

section "wrong inputs: refused at add, one line"
N="--url $H/disk.img --cache $C/x.cache --bitmap $C/x.bitmap"
refused "the root of another image" "root|hash|verity" $N --verity-root $OTHERROOT --verity-tree $H/disk.tree
refused "the tree of another image" "root|hash|verity" $N --verity-root $ROOT --verity-tree $T/other.tree
refused "a tree covering half the image" "verity|tree|block|size" $N --verity-root $HALFROOT --verity-tree $T/half.tree
refused "a tree one block short" "verity|tree|short|trunc" $N --verity-root $ROOT --verity-tree $T/trunc.tree
refused "a tree of 8 KiB" "verity|tree|short|trunc" $N --verity-root $ROOT --verity-tree $T/short.tree
refused "a missing tree file" "No such file|verity|tree" $N --verity-root $ROOT --verity-tree $T/nope.tree
# (A fresh cache: a tree kept beside a cache, that verifies against the root, is used again whatever the URL.)
refused "a tree URL that answers 404" "404|verity|tree" --url $H/disk.img --cache $C/y.cache --bitmap $C/y.bitmap --verity-root $ROOT --verity-tree $H/nope.tree
refused "no superblock at --verity-offset" "superblock|verity" $N --verity-root $ROOT --verity-offset $((16 << 20))
refused "a root that is not hex" "root|hex" $N --verity-root "${ROOT:0:62}zz" --verity-tree $H/disk.tree
refused "a root of the wrong length" "root|hex|length|digest" $N --verity-root "${ROOT:0:32}" --verity-tree $H/disk.tree
check "nothing left" no_devices

dmsetup --noudevsync remove vapp >/dev/null 2>&1; /usr/sbin/losetup -d $LOOP 2>/dev/null
$VS close vdisk; $VS close vbad
finish
