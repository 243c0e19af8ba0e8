# The device table without systemd (the busybox guest; tests/vm-systemd/
# runs the units): check, up/down by name, the udev name file, serve after a
# kill -9 recovers the same device, names in list and metrics.
source /tests/lib.sh
set -o pipefail

TAB=/tmp/ublktab
truncate -s 64M /tmp/disk.img
head -c 1M /dev/urandom > /tmp/head.bin
dd if=/tmp/head.bin of=/tmp/disk.img conv=notrunc status=none
cat > $TAB <<'EOF'
# NAME    TARGET  SOURCE          OPTIONS
scratch   null    -               size=16M
disk      loop    /tmp/disk.img   queues=2
EOF
name_field() { "$UBLK" list | jq -r --arg n "$1" ".[] | select(.name == \$n) | .$2"; }
served() { [ -n "$(name_field "$1" pid)" ]; }

section "check"
eq "a good table" "$TAB: 2 devices, no errors" "$("$UBLK" check --table $TAB)"
cp $TAB /tmp/bad
printf 'x y\nscratch null - size=1M\nbig null - size=1Q\n' >> /tmp/bad
out=$("$UBLK" check --table /tmp/bad); rc=$?
eq "bad lines: exit 1" 1 "$rc"
eq "one line per error, with its number" "/tmp/bad:4: expected NAME TARGET SOURCE [OPTIONS], found 2 fields
/tmp/bad:5: 'scratch' is declared twice (first on line 2)
/tmp/bad:6: bad size '1Q': expected a number of bytes of at least 512 and below 8E, with an optional K, M, G, T, P or E suffix" "$out"
expect_error "a missing table" "cannot read the device table /nonexistent" "$UBLK" check --table /nonexistent
expect_error "up of an undeclared name" "not declared in $TAB: nope" "$UBLK" up --table $TAB nope

section "up by name, without systemd"
out=$("$UBLK" up --table $TAB 2>&1)
eq "up prints both devices" "disk scratch" "$(echo "$out" | jq -rs 'map(.name) | sort | join(" ")')"
for n in scratch disk; do
    id=$(name_field "$n" dev_id)
    eq "$n: the udev name file" "UBLK_HTTP_NAME=$n" "$(cat /run/ublk-http/ublkb$id.udev)"
done
check "the loop device reads its file" cmp -n 1048576 /tmp/head.bin "$(name_field disk block_device)"
eq "up again starts nothing" "disk: up as $(name_field disk block_device)" "$("$UBLK" up --table $TAB disk 2>&1)"
expect_error "add with a name in use" "the name 'disk' is taken by ublk$(name_field disk dev_id)" \
    "$UBLK" add -t null --size 1M --name disk
check "metrics" bash -c "\"$UBLK\" metrics > /tmp/metrics.prom"
check "metrics: disk is LIVE" grep -q '^ublk_http_device_state{name="disk",device="ublkb[0-9]*",state="LIVE"} 1$' /tmp/metrics.prom
check "metrics: scratch too" grep -q '^ublk_http_device_queues{name="scratch",device="ublkb[0-9]*"} 1$' /tmp/metrics.prom
id=$(name_field disk dev_id)
check "down disk" "$UBLK" down --table $TAB disk
eq "disk is gone, scratch stays" "scratch" "$("$UBLK" list | jq -r '[.[].name] | join(" ")')"
check "the udev name file went with it" gone /run/ublk-http/ublkb$id.udev

section "serve: kill -9, then serve again recovers the same device"
"$UBLK" serve --table $TAB disk > /tmp/serve1.log 2>&1 &
check "serve brings it up" wait_for 30 served disk
id=$(name_field disk dev_id); dev=$(name_field disk block_device); pid1=$(name_field disk pid)
eq "served in the foreground" "$!" "$pid1"
eq "with --recovery" true "$(jq -r .recovery /run/ublk-http/ublk$id.json)"
fio --name=s --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --size=24M --iodepth=16 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio-serve.txt >/dev/null 2>&1 &
FIO=$!
sleep 3
kill -9 "$pid1"; wait_for 5 dead "$pid1"
check "fio waits" alive $FIO
"$UBLK" serve --table $TAB disk > /tmp/serve2.log 2>&1 &
SERVE2=$!
check "fio completes" wait_for 300 dead $FIO
wait $FIO; eq "fio verified (exit 0)" 0 "$?"
eq "the same device" "$id $SERVE2" "$(name_field disk dev_id) $(name_field disk pid)"
eq "one restart" 1 "$(name_field disk restarts)"
check "metrics count it" bash -c "\"$UBLK\" metrics | grep -qx 'ublk_http_server_restarts_total{name=\"disk\",device=\"ublkb$id\"} 1'"
expect_error "a second serve of a served name" "'disk' is up as $dev, served by pid $SERVE2" "$UBLK" serve --table $TAB disk
kill -TERM $SERVE2
check "SIGTERM: the server exits" wait_for 30 dead $SERVE2
check "SIGTERM: the device is removed" wait_for 10 gone "$dev"

section "down everything"
check "down" "$UBLK" down --table $TAB
eq "no device left" 0 "$("$UBLK" list | jq length)"
finish
