# Issue 9 on the real driver: the page-state model of the caching targets.
# Local writes are never replaced by remote bytes (whatever their dirty bit
# says), eviction never races I/O in flight, a cache file system that runs
# full fails reads with EIO and never hangs or serves wrong bytes.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; C=/var/tmp/integrity
mkdir -p $WWW $C
head -c $((64 << 20)) /dev/urandom > $WWW/disk.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
FIO="fio --ioengine=io_uring --direct=1 --iodepth=16 --randrepeat=1 --randseed=7 --verify_fatal=1"
same() { cmp <(dd if=$1 bs=1M skip=$2 count=$3 iflag=direct 2>/dev/null) <(dd if=$4 bs=1M skip=$2 count=$3 2>/dev/null); }

section "class 1: written pages survive dirty --clear and eviction (not refetched)"
if add -t http --url $URL --cache $C/o.cache --bitmap $C/o.bitmap --writable --cache-max-size 4M; then
    head -c $((16 << 20)) /dev/urandom > /tmp/w16
    check "write 16 MiB" dd if=/tmp/w16 of=$DEV_B bs=1M oflag=direct conv=fsync
    check "dirty --clear" "$UBLK" dirty -n $DEV_ID --clear
    eq "nothing dirty" 0 "$("$UBLK" dirty -n $DEV_ID | jq -r .pages)"
    # Reading 48 MiB through a 4 MiB bound evicts every clean page, many times over.
    check "read the other 48 MiB (evicting)" same $DEV_B 16 48 $WWW/disk.img
    check "read it again" same $DEV_B 16 48 $WWW/disk.img
    check "the written 16 MiB still read back (never refetched)" bash -c "cmp <(dd if=$DEV_B bs=1M count=16 iflag=direct 2>/dev/null) /tmp/w16"
    # Allocated: the local 16 MiB plus at most the bound and its slack.
    A=$(( $(stat -c %b $C/o.cache) * 512 ))
    echo "# cache file holds $A bytes"
    check "the bound holds for clean pages" test $A -le $(( (16 + 4 + 2) << 20 ))
    check "del" del $DEV_ID
else
    fail "add --writable --cache-max-size" "$DEV_JSON"
fi

section "class 1: a changed remote does not wipe an overlay whose dirty list is empty"
touch -d '2030-01-01' $WWW/disk.img   # new Last-Modified and ETag, same bytes
expect_error "add refuses (local pages would be lost)" "local|written" \
    "$UBLK" add -t http --url $URL --cache $C/o.cache --bitmap $C/o.bitmap --writable
touch -d '2031-01-01' $WWW/disk.img

section "class 2: eviction under fio --verify on a writable overlay (bound far below the working set)"
if add -t http --url $URL --cache $C/e.cache --bitmap $C/e.bitmap --writable --cache-max-size 2M; then
    check "fio randrw verify 24M" $FIO --name=ev --filename=$DEV_B --rw=randrw --bs=4k --size=24M \
        --verify=crc32c --do_verify=1 --output=/tmp/fio-ev.txt
    check "fio seq verify 1M blocks" $FIO --name=ev2 --filename=$DEV_B --rw=write --bs=1M --offset=32M --size=16M \
        --verify=crc32c --do_verify=1 --output=/tmp/fio-ev2.txt
    check "bytes nobody wrote are the remote's" same $DEV_B 48 16 $WWW/disk.img
    check "del" del $DEV_ID
else
    fail "add overlay --cache-max-size 2M" "$DEV_JSON"
fi

section "class 2: eviction under fio --verify on a write-back cache"
truncate -s 64M /tmp/back.img
if add -t cache --backing /tmp/back.img --cache $C/b.cache --bitmap $C/b.bitmap --write-mode back --cache-max-size 2M; then
    check "fio randwrite verify 32M" $FIO --name=wb --filename=$DEV_B --rw=randwrite --bs=4k --size=32M \
        --verify=crc32c --do_verify=1 --output=/tmp/fio-wb.txt
    check "flush" timeout 120 "$UBLK" flush -n $DEV_ID
    check "the backing alone equals the device" cmp $DEV_B /tmp/back.img
    check "del" del $DEV_ID
else
    fail "add cache back --cache-max-size 2M" "$DEV_JSON"
fi

section "class 6: the cache file system runs full: reads fail with EIO, never hang, never wrong bytes"
mkdir -p /mnt/small && mount -t tmpfs -o size=8m tmpfs /mnt/small
if add -t http --url $URL --cache /mnt/small/c --bitmap $C/s.bitmap; then
    check "the first 4 MiB read back" same $DEV_B 0 4 $WWW/disk.img
    timeout 120 dd if=$DEV_B of=/tmp/all bs=1M iflag=direct 2>/tmp/dd.err; rc=$?
    echo "# dd: exit $rc: $(tail -n 1 /tmp/dd.err)"
    check "reading it all fails (the cache is full) and does not hang" test $rc -ne 0 -a $rc -lt 124
    check "with EIO" grep -q "Input/output error" /tmp/dd.err
    check "what dd got before the error is the remote's" cmp -n $(stat -c %s /tmp/all) /tmp/all $WWW/disk.img
    check "the server is alive" alive $DEV_PID
    check "the first 4 MiB still read back" same $DEV_B 0 4 $WWW/disk.img
    check "del" del $DEV_ID
else
    fail "add with the cache on a small tmpfs" "$DEV_JSON"
fi
rm -f /mnt/small/c $C/s.bitmap*
if add -t http --url $URL --cache /mnt/small/c --bitmap $C/s.bitmap --cache-max-size 4M; then
    check "with --cache-max-size under the file system's size, it all reads back" same $DEV_B 0 64 $WWW/disk.img
    check "del" del $DEV_ID
else
    fail "add with --cache-max-size 4M on a small tmpfs" "$DEV_JSON"
fi
umount /mnt/small

finish
