# Zero copy chosen at run time, on the real driver: the
# data path each device reports, fio --verify (random sizes 512 B - 1 MiB)
# through it for loop (a file on ext4, a block device), cache (cache file and
# backing on ext4) and http (hits, and an overlay's writes), every path forced
# in turn, and a forced path the driver lacks refused with one line.
# Expected paths come from `features`: auto-zero-copy where the driver has
# UBLK_F_AUTO_BUF_REG (6.16+), zero-copy where it has only
# UBLK_F_SUPPORT_ZERO_COPY, user-copy on 6.12.
source /tests/lib.sh
set -o pipefail

FEAT=$("$UBLK" features | jq -r '.features[]')
has() { grep -qx "$1" <<<"$FEAT"; }
if has UBLK_F_AUTO_BUF_REG; then EXPECT=auto-zero-copy
elif has UBLK_F_SUPPORT_ZERO_COPY; then EXPECT=zero-copy
else EXPECT=user-copy; fi
echo "# kernel $(uname -r): expecting $EXPECT"
case "$(uname -r)" in
    7.*) eq "a 7.x driver registers buffers by itself (auto-zero-copy)" auto-zero-copy "$EXPECT" ;;
    6.12.*) eq "6.12 has user copy and no zero copy" user-copy "$EXPECT" ;;
esac

# The device's data path, from add's JSON and from list.
path_of() { "$UBLK" list -n "$1" | jq -r '.[0].data_path'; }
VERIFY="fio --ioengine=io_uring --direct=1 --iodepth=16 --bsrange=512-1m --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=0"

section "ext4 on a RAM disk (brd) for the files"
kmod-load brd rd_nr=2 rd_size=$((448 << 10))
mkdir -p /mnt/e
check "mkfs.ext4 on /dev/ram0" mkfs.ext4 -q -F /dev/ram0
check "mount" mount -t ext4 /dev/ram0 /mnt/e
E=/mnt/e

section "loop over a file on ext4: the chosen path, data both ways"
truncate -s 48M $E/loop.img
if add -t loop -f $E/loop.img; then
    eq "add JSON data_path" "$EXPECT" "$(echo "$DEV_JSON" | jq -r .data_path)"
    eq "list data_path" "$EXPECT" "$(path_of "$DEV_ID")"
    head -c $((3 << 20)) /dev/urandom > /tmp/pat
    check "write 3 MiB at an odd sector" dd if=/tmp/pat of="$DEV_B" bs=64k seek=$((4097 * 512)) oflag=direct,seek_bytes conv=fsync
    check "read it back" bash -c "dd if=$DEV_B bs=64k skip=$((4097 * 512)) count=48 iflag=direct,skip_bytes 2>/dev/null | cmp - /tmp/pat"
    check "the bytes are in the file" bash -c "dd if=$E/loop.img bs=64k skip=$((4097 * 512)) count=48 iflag=skip_bytes 2>/dev/null | cmp - /tmp/pat"
    check "fio randwrite 512B-1M verify, 32M" $VERIFY --name=loop --filename="$DEV_B" --rw=randwrite --size=32M --output=/tmp/fio-loop.txt
    check "fio randrw 512B-1M" fio --name=mix --filename="$DEV_B" --ioengine=io_uring --direct=1 --iodepth=16 \
        --bsrange=512-1m --rw=randrw --size=32M --io_size=32M --output=/tmp/fio-mix.txt
    D=$(md5sum < "$DEV_B")
    check "del" del "$DEV_ID"
    eq "device and file hold the same bytes" "$D" "$(md5sum < $E/loop.img)"
else
    fail "add -t loop on ext4" "$DEV_JSON"
fi

section "loop over a block device"
if add -t loop -f /dev/ram1; then
    eq "data_path" "$EXPECT" "$(path_of "$DEV_ID")"
    check "fio randwrite 512B-1M verify, 32M" $VERIFY --name=blk --filename="$DEV_B" --rw=randwrite --size=32M --output=/tmp/fio-blk.txt
    D=$(dd if="$DEV_B" bs=1M count=32 iflag=direct 2>/dev/null | md5sum)
    del "$DEV_ID" >/dev/null
    eq "device and RAM disk hold the same bytes" "$D" "$(dd if=/dev/ram1 bs=1M count=32 iflag=direct 2>/dev/null | md5sum)"
else
    fail "add -t loop on /dev/ram1" "$DEV_JSON"
fi

section "every data path forced, where the driver has it"
for p in auto-zero-copy zero-copy user-copy kernel-copy; do
    case $p in
        auto-zero-copy) need=UBLK_F_AUTO_BUF_REG ;;
        zero-copy) need=UBLK_F_SUPPORT_ZERO_COPY ;;
        user-copy) need=UBLK_F_USER_COPY ;;
        *) need= ;;
    esac
    if [ -n "$need" ] && ! has "$need"; then
        expect_error "--data-path $p refused (no $need)" "data-path $p needs $need" "$UBLK" add -t loop -f $E/loop.img --data-path $p
        continue
    fi
    if add -t loop -f $E/loop.img --data-path $p; then
        eq "forced $p: list says so" "$p" "$(path_of "$DEV_ID")"
        check "forced $p: write 3 MiB at an odd sector" dd if=/tmp/pat of="$DEV_B" bs=64k seek=$((4097 * 512)) oflag=direct,seek_bytes conv=fsync
        check "forced $p: fio 512B-1M verify, 8M" $VERIFY --name=f --filename="$DEV_B" --rw=randwrite --size=8M --offset=16M --output=/tmp/fio-$p.txt
        check "forced $p: read the 3 MiB back" bash -c "dd if=$DEV_B bs=64k skip=$((4097 * 512)) count=48 iflag=direct,skip_bytes 2>/dev/null | cmp - /tmp/pat"
        del "$DEV_ID" >/dev/null
    else
        fail "add --data-path $p" "$DEV_JSON"
    fi
done
expect_error "an unknown path" "unknown --data-path 'fast'" "$UBLK" add -t loop -f $E/loop.img --data-path fast
expect_error "inline-user-copy needs a file in memory" "does not apply" "$UBLK" add -t loop -f $E/loop.img --data-path inline-user-copy
check "no server left behind by refused adds" bash -c "! pgrep -x ublk-http"

section "cache: cache file and backing on ext4"
head -c $((32 << 20)) /dev/urandom > $E/back.img
cp $E/back.img /tmp/back.orig
if add -t cache --backing $E/back.img --cache $E/c.cache --bitmap $E/c.bitmap --write-mode through; then
    eq "data_path" "$EXPECT" "$(path_of "$DEV_ID")"
    check "cold read equals the backing (misses land in the cache file, then hits)" cmp "$DEV_B" /tmp/back.orig
    sleep 1.2
    B=$("$UBLK" stats -n "$DEV_ID" --json | jq -r .bytes_fetched)
    check "warm read equals the backing (hits)" cmp "$DEV_B" /tmp/back.orig
    sleep 1.2
    eq "the warm read fetched nothing" "$B" "$("$UBLK" stats -n "$DEV_ID" --json | jq -r .bytes_fetched)"
    check "fio randwrite 512B-1M verify, 24M (write-through)" $VERIFY --name=c --filename="$DEV_B" --rw=randwrite --size=24M --output=/tmp/fio-c.txt
    check "a FLUSH" dd if=/tmp/pat of="$DEV_B" bs=4k count=1 seek=3 oflag=direct conv=fsync
    check "backing equals the device" cmp "$DEV_B" $E/back.img
    del "$DEV_ID" >/dev/null
else
    fail "add -t cache" "$DEV_JSON"
fi
if add -t cache --backing $E/back.img --cache $E/c.cache --bitmap $E/c.bitmap --write-mode back; then
    eq "write-back: data_path" "$EXPECT" "$(path_of "$DEV_ID")"
    check "write-back: fio randwrite 512B-1M verify, 24M" $VERIFY --name=b --filename="$DEV_B" --rw=randwrite --size=24M --offset=4M --output=/tmp/fio-b.txt
    D=$(md5sum < "$DEV_B")
    check "flush" timeout 120 "$UBLK" flush -n "$DEV_ID"
    del "$DEV_ID" >/dev/null
    eq "backing holds the device's bytes after flush" "$D" "$(md5sum < $E/back.img)"
else
    fail "add -t cache --write-mode back" "$DEV_JSON"
fi

section "http: hits served from a cache file on ext4"
mkdir -p /srv/zc
head -c $((24 << 20)) /dev/urandom > /srv/zc/img
head -c 1000003 /dev/urandom > /srv/zc/odd
check "nginx" nginx-start /srv/zc 8080
if add -t http --url http://127.0.0.1:8080/img --cache $E/h.cache --bitmap $E/h.bitmap; then
    eq "data_path" "$EXPECT" "$(path_of "$DEV_ID")"
    check "cold read equals the object" cmp "$DEV_B" /srv/zc/img
    check "hits: read again" cmp "$DEV_B" /srv/zc/img
    check "hits: fio random reads 512B-1M" fio --name=h --filename="$DEV_B" --ioengine=io_uring --direct=1 --iodepth=16 \
        --bsrange=512-1m --rw=randread --size=24M --io_size=48M --output=/tmp/fio-h.txt
    check "hits: read again after fio" cmp "$DEV_B" /srv/zc/img
    del "$DEV_ID" >/dev/null
else
    fail "add -t http" "$DEV_JSON"
fi
if add -t http --url http://127.0.0.1:8080/odd --cache $E/o.cache --bitmap $E/o.bitmap; then
    check "an object of 1000003 bytes: the last sector's tail reads as zeros" \
        cmp "$DEV_B" <(cat /srv/zc/odd; head -c $((1000448 - 1000003)) /dev/zero)
    del "$DEV_ID" >/dev/null
else
    fail "add -t http (odd size)" "$DEV_JSON"
fi
if add -t http --url http://127.0.0.1:8080/img --cache $E/w.cache --bitmap $E/w.bitmap --writable; then
    eq "overlay: data_path" "$EXPECT" "$(path_of "$DEV_ID")"
    check "overlay: fio randwrite 512B-1M verify, 16M (writes, then hits)" $VERIFY --name=w --filename="$DEV_B" --rw=randwrite --size=16M --output=/tmp/fio-w.txt
    del "$DEV_ID" >/dev/null
else
    fail "add -t http --writable" "$DEV_JSON"
fi
nginx-stop

umount /mnt/e
finish
