#!/usr/bin/bash
# Guest side of vm/selftest.sh (runs inside the VM as /test/script).
set -euo pipefail
pass=0 fail=0
ok()  { echo "selftest: ok   - $*"; pass=$((pass+1)); }
bad() { echo "selftest: FAIL - $*"; fail=$((fail+1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

echo "selftest: kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"

# GNU userland first in bash's PATH
check "head -c 1M is GNU (busybox lacks suffixes)" test "$(head -c 1M /dev/zero | wc -c)" = 1048576
check "jq works" test "$(echo '{"a":[1,2]}' | jq -r '.a[1]')" = 2

# ublk_drv is loaded by /init.
check "ublk_drv loaded at boot" test -d /sys/module/ublk_drv
check "/dev/ublk-control exists" test -c /dev/ublk-control
check "kmod-load is idempotent" kmod-load ublk_drv

# brd + ext4
kmod-load brd rd_nr=1 rd_size=262144    # one 256 MiB ramdisk
check "/dev/ram0 exists" test -b /dev/ram0
check "mkfs.ext4 /dev/ram0" mkfs.ext4 -q -F /dev/ram0
mkdir -p /mnt/ram
check "mount ext4" mount -t ext4 /dev/ram0 /mnt/ram
head -c 3000000 /dev/urandom > /tmp/blob
cp /tmp/blob /mnt/ram/blob
umount /mnt/ram
mount -t ext4 -o ro /dev/ram0 /mnt/ram
check "file survives remount" cmp /tmp/blob /mnt/ram/blob
umount /mnt/ram
check "e2fsck clean" e2fsck -fn /dev/ram0

# mkfs.ext4 -d on a file + util-linux losetup
kmod-load loop
mkdir -p /tmp/tree/sub && cp /tmp/blob /tmp/tree/sub/blob && echo hello > /tmp/tree/hello
check "mkfs.ext4 -d into an image file" mkfs.ext4 -q -F -d /tmp/tree /tmp/img.ext4 64M
check "losetup is util-linux" bash -c 'losetup --version | grep -q util-linux'
dev=$(losetup -f --show --direct-io=on /tmp/img.ext4)
check "losetup -f --show ($dev)" test -b "$dev"
losetup -l
mount -o ro "$dev" /mnt/ram
check "loop-mounted -d image has the files" cmp /tmp/blob /mnt/ram/sub/blob
umount /mnt/ram
check "blkdiscard on the loop device" blkdiscard -f "$dev"
check "losetup -d" losetup -d "$dev"
check "taskset is util-linux" bash -c 'taskset --version | grep -q util-linux'
check "taskset -c 0" taskset -c 0 true

kmod-load nbd nbds_max=2
check "nbd loads (/dev/nbd0)" test -b /dev/nbd0

# nginx + curl range request
mkdir -p /srv/www
cp /tmp/blob /srv/www/blob
nginx-start /srv/www
code=$(curl -s -o /tmp/range.out -w '%{http_code}' -r 0-9 http://127.0.0.1:8080/blob)
check "curl -r 0-9 gives 206 (got $code)" test "$code" = 206
check "range body is the first 10 bytes" cmp /tmp/range.out <(head -c 10 /tmp/blob)
check "localhost resolves" curl -sf -o /dev/null http://localhost:8080/blob
check "access log records the range" grep -q '"bytes=0-9"' /var/log/nginx/access.log
tail -n 2 /var/log/nginx/access.log
nginx-stop
check "nginx stopped" bash -c '! curl -s -o /dev/null http://127.0.0.1:8080/blob'

# fio on the ramdisk
check "fio 5 s io_uring randrw on /dev/ram0" \
    fio --name=smoke --filename=/dev/ram0 --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
        --iodepth=8 --runtime=5 --time_based --size=64M --eta=never --output=/tmp/fio.out
grep -E '^ *(read|write):' /tmp/fio.out || true

# orphaned daemons get reaped by PID 1
( sleep 1000 & echo $! > /tmp/orphan.pid )
opid=$(cat /tmp/orphan.pid)
kill "$opid"
for _ in $(seq 50); do [[ -e /proc/$opid ]] || break; sleep 0.1; done
check "orphans are reaped" test ! -e /proc/$opid

# optional Swift binary (selftest builds one when swiftc is available)
if [[ -x /usr/local/bin/swift-hello ]]; then
    out=$(swift-hello 2>&1) || true
    check "swift binary runs ($out)" test "$out" = "hello from swift 42"
fi

echo "selftest: $pass passed, $fail failed"
[[ $fail -eq 0 ]]
