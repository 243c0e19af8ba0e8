# User recovery on the real driver: kill -9 under fio with --recovery,
# `recover`, fio completes and verifies.
source /tests/lib.sh
set -o pipefail

truncate -s 256M /tmp/rec.img
section "kill -9 of a --recovery server under fio, then recover"
if add -t loop -f /tmp/rec.img --recovery; then
    eq "list shows recovery" true "$(echo "$DEV_JSON" | jq -r .recovery)"
    fio --name=rec --filename="$DEV_B" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --size=128M \
        --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio-rec.txt >/dev/null 2>&1 &
    FIO=$!
    sleep 4
    OLD=$DEV_PID
    kill -9 "$OLD"
    check "old server died" wait_for 5 dead "$OLD"
    sleep 2
    check "the device stays while no server runs" test -b "$DEV_B"
    check "fio is waiting, not failing" alive $FIO
    eq "list shows the device quiesced" QUIESCED "$("$UBLK" list -n "$DEV_ID" | jq -r '.[0].state')"
    R=$(timeout 60 "$UBLK" recover -n "$DEV_ID" 2>&1)
    if [ $? -eq 0 ]; then ok "recover -n"; else fail "recover -n" "$R"; fi
    NEW=$(echo "$R" | jq -r .pid)
    check "a new server serves it" bash -c "[ '$NEW' != '$OLD' ] && grep -q ublk-http /proc/$NEW/comm"
    eq "list shows it LIVE again" LIVE "$("$UBLK" list -n "$DEV_ID" | jq -r '.[0].state')"
    check "fio completes" wait_for 600 dead $FIO
    wait $FIO; RC=$?
    eq "fio verified every block (exit 0)" 0 "$RC"
    check "fio reports no errors" bash -c "grep -q 'err= 0' /tmp/fio-rec.txt"
    check "del" del "$DEV_ID"
    check "device gone" gone "$DEV_B"
else
    fail "add --recovery" "$DEV_JSON"
fi

section "recover: bad cases"
expect_error "recover of a missing device" "no such device" "$UBLK" recover -n 9
if add -t null --size 16M; then
    expect_error "recover of a live device" "is live" "$UBLK" recover -n "$DEV_ID"
    kill -9 "$DEV_PID"; wait_for 5 dead "$DEV_PID"
    expect_error "recover of a device added without --recovery" "without --recovery|cannot be recovered|not added with" "$UBLK" recover -n "$DEV_ID"
    del "$DEV_ID" >/dev/null
fi
eq "nothing left" "[]" "$("$UBLK" list)"

finish
