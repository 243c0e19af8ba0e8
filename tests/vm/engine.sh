# On the real driver: null and loop targets, the CLI, lifecycle under
# load, kill -9, bad inputs. Runs inside the VM (see tests/vm.sh).
source /tests/lib.sh
set -o pipefail

section "features"
F=$("$UBLK" features)
check "features is JSON naming UBLK_F_CMD_IOCTL_ENCODE" bash -c "echo '$F' | jq -e '.features | index(\"UBLK_F_CMD_IOCTL_ENCODE\")'"
eq "features names every bit the driver reports" "" "$(echo "$F" | jq -r '.features[] | select(startswith("bit "))')"
KMAJOR=$(uname -r | cut -d. -f1)
if [[ $KMAJOR -ge 7 ]]; then
    check "a 7.x driver offers zero copy and auto buffer registration" bash -c \
        "echo '$F' | jq -e '(.features | index(\"UBLK_F_SUPPORT_ZERO_COPY\")) and (.features | index(\"UBLK_F_AUTO_BUF_REG\"))'"
fi

section "null: add, read, write, list, del"
if add -t null --size 1G; then
    ok "add -t null"
    eq "add JSON names the target" null "$(echo "$DEV_JSON" | jq -r .target)"
    eq "add JSON char_device" "/dev/ublkc$DEV_ID" "$(echo "$DEV_JSON" | jq -r .char_device)"
    check "block device exists when add returns" test -b "$DEV_B"
    check "server pid is alive and is ublk-http" bash -c "grep -q ublk-http /proc/$DEV_PID/comm"
    eq "null size 1G" 1073741824 "$(blockdev --getsize64 "$DEV_B")"
    check "null reads zeros" bash -c "dd if=$DEV_B bs=1M count=8 iflag=direct 2>/dev/null | cmp -s - <(head -c 8388608 /dev/zero)"
    check "null accepts writes" dd if=/dev/urandom of="$DEV_B" bs=64k count=16 oflag=direct
    check "null reads zeros after writes" bash -c "dd if=$DEV_B bs=64k count=16 iflag=direct 2>/dev/null | cmp -s - <(head -c 1048576 /dev/zero)"
    L=$("$UBLK" list)
    eq "list shows it LIVE" LIVE "$(echo "$L" | jq -r ".[] | select(.dev_id == $DEV_ID) | .state")"
    eq "list shows target" null "$(echo "$L" | jq -r ".[] | select(.dev_id == $DEV_ID) | .target")"
    eq "list shows size" 1073741824 "$(echo "$L" | jq -r ".[] | select(.dev_id == $DEV_ID) | .size")"
    eq "list -n shows pid" "$DEV_PID" "$("$UBLK" list -n "$DEV_ID" | jq -r '.[0].pid')"
    check "del -n" del "$DEV_ID"
    check "block device gone after del" gone "$DEV_B"
    check "char device gone after del" gone "/dev/ublkc$DEV_ID"
    check "server exited after del" wait_for 5 dead "$DEV_PID"
    eq "list is empty" "[]" "$("$UBLK" list)"
else
    fail "add -t null" "$DEV_JSON"
fi

section "loop: data reaches the file"
truncate -s 300M /tmp/loop.img
if add -t loop -f /tmp/loop.img; then
    ok "add -t loop"
    eq "loop size" 314572800 "$(blockdev --getsize64 "$DEV_B")"
    head -c 4194304 /dev/urandom > /tmp/pattern
    check "write 4M at 1M offset" dd if=/tmp/pattern of="$DEV_B" bs=1M seek=1 oflag=direct conv=fsync
    check "read it back" bash -c "dd if=$DEV_B bs=1M skip=1 count=4 iflag=direct 2>/dev/null | cmp -s - /tmp/pattern"
    check "bytes are in the backing file" bash -c "dd if=/tmp/loop.img bs=1M skip=1 count=4 2>/dev/null | cmp -s - /tmp/pattern"
    check "unaligned 512-byte write" bash -c "head -c 512 /tmp/pattern | dd of=$DEV_B bs=512 seek=3 oflag=direct 2>/dev/null && dd if=/tmp/loop.img bs=512 skip=3 count=1 2>/dev/null | cmp -s - <(head -c 512 /tmp/pattern)"
    check "discard punches the range" bash -c "blkdiscard -o 1048576 -l 1048576 $DEV_B && dd if=/tmp/loop.img bs=1M skip=1 count=1 2>/dev/null | cmp -s - <(head -c 1048576 /dev/zero)"
    check "write-zeroes zeroes the range" bash -c "blkdiscard -z -o 2097152 -l 1048576 $DEV_B && dd if=$DEV_B bs=1M skip=2 count=1 iflag=direct 2>/dev/null | cmp -s - <(head -c 1048576 /dev/zero)"
    eq "list shows loop file" /tmp/loop.img "$("$UBLK" list -n "$DEV_ID" | jq -r '.[0].target_options.file')"

    section "loop: fio --verify=crc32c, random writes over 128 MiB"
    check "fio randwrite verify 128M" fio --name=verify --filename="$DEV_B" --ioengine=io_uring --direct=1 \
        --rw=randwrite --bsrange=4k-128k --size=128M --iodepth=32 --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randrepeat=0 --output=/tmp/fio-verify.txt
    check "del loop" del "$DEV_ID"
else
    fail "add -t loop" "$DEV_JSON"
fi

section "loop: ext4 survives del and add"
truncate -s 256M /tmp/fs.img
if add -t loop -f /tmp/fs.img; then
    check "mkfs.ext4" mkfs.ext4 -q -F "$DEV_B"
    mkdir -p /mnt/a
    check "mount" mount -t ext4 "$DEV_B" /mnt/a
    for i in 1 2 3 4 5; do head -c $(( (i * 3 + 1) << 19 )) /dev/urandom > /mnt/a/file$i; done
    mkdir -p /mnt/a/dir && seq 1 20000 > /mnt/a/dir/numbers
    (cd /mnt/a && sha256sum file* dir/numbers) > /tmp/sums
    check "umount" umount /mnt/a
    check "del" del "$DEV_ID"
    if add -t loop -f /tmp/fs.img; then
        check "mount again" mount -t ext4 -o ro "$DEV_B" /mnt/a
        check "checksums equal after del/add" bash -c "cd /mnt/a && sha256sum -c /tmp/sums"
        check "fsck clean" bash -c "umount /mnt/a && e2fsck -fn $DEV_B"
        del "$DEV_ID" >/dev/null
    else
        fail "add again" "$DEV_JSON"
    fi
else
    fail "add -t loop for ext4" "$DEV_JSON"
fi

section "two queues"
if add -t loop -f /tmp/loop.img -q 2 -d 64; then
    eq "two hardware queues" 2 "$(ls /sys/block/ublkb$DEV_ID/mq | wc -l)"
    eq "list shows 2 queues" 2 "$("$UBLK" list -n "$DEV_ID" | jq -r '.[0].queues')"
    check "fio verify on both queues" fio --name=q2 --filename="$DEV_B" --ioengine=io_uring --direct=1 \
        --rw=randwrite --bs=4k --size=32M --iodepth=16 --numjobs=2 --offset_increment=32M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --cpus_allowed_policy=split --cpus_allowed=0-1 \
        --output=/tmp/fio-q2.txt
    check "del two-queue device" del "$DEV_ID"
else
    fail "add -q 2" "$DEV_JSON"
fi

section "del while fio runs"
if add -t loop -f /tmp/loop.img; then
    fio --name=busy --filename="$DEV_B" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=32 \
        --time_based --runtime=120 --output=/tmp/fio-busy.txt >/dev/null 2>&1 &
    FIO=$!
    sleep 3
    check "fio is running" alive $FIO
    check "del returns while fio runs" del "$DEV_ID"
    check "block device gone" gone "$DEV_B"
    check "fio ends (I/O errors, no hang)" wait_for 30 dead $FIO
    check "server gone" wait_for 5 dead "$DEV_PID"
    kill -9 $FIO 2>/dev/null; wait $FIO 2>/dev/null
else
    fail "add for del-under-load" "$DEV_JSON"
fi

section "kill -9 of the server under I/O"
if add -t loop -f /tmp/loop.img; then
    fio --name=busy --filename="$DEV_B" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=32 \
        --time_based --runtime=120 --output=/tmp/fio-kill.txt >/dev/null 2>&1 &
    FIO=$!
    sleep 3
    kill -9 "$DEV_PID"
    check "server died" wait_for 5 dead "$DEV_PID"
    check "block device goes away" wait_for 30 gone "$DEV_B"
    check "fio ends" wait_for 30 dead $FIO
    kill -9 $FIO 2>/dev/null; wait $FIO 2>/dev/null
    eq "list shows the stale device" "false" "$("$UBLK" list -n "$DEV_ID" | jq -r '.[0].server_running')"
    check "del cleans up the stale device" del "$DEV_ID"
    check "char device gone" gone "/dev/ublkc$DEV_ID"
    eq "nothing left" "[]" "$("$UBLK" list)"
else
    fail "add for kill -9" "$DEV_JSON"
fi

section "bad inputs: one line, non-zero exit"
expect_error "unknown target" "unknown target type 'bogus'" "$UBLK" add -t bogus
expect_error "missing file" "No such file" "$UBLK" add -t loop -f /tmp/nope.img
expect_error "bad size" "bad size '12Q'" "$UBLK" add -t null --size 12Q
expect_error "size too small" "bad size" "$UBLK" add -t null --size 100
expect_error "del of a missing device" "no such device: ublk42" "$UBLK" del -n 42
expect_error "not root" "must be run as root" /usr/local/bin/setpriv --reuid=65534 --regid=65534 --clear-groups "$UBLK" add -t null
if add -t null -n 7 --size 1M; then
    expect_error "id taken" "id 7 is taken" "$UBLK" add -t null -n 7
    del 7 >/dev/null
else
    fail "add -n 7" "$DEV_JSON"
fi
check "no server left behind by failed adds" bash -c "! pgrep -x ublk-http"
rmmod ublk_drv
expect_error "no ublk_drv" "ublk driver is not loaded.*modprobe ublk_drv" "$UBLK" add -t null
kmod-load ublk_drv

finish
