# On the real driver: a server crash is not a power loss.
# A caching server killed (-9) under load in the same boot loses no write it
# acknowledged, FLUSHed or not: the page states it had set in memory are in
# a shared mapping on /run/ublk-http/live and the next server takes them over
# (`recover` of a --recovery device, or a plain `add` again).
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; C=/var/tmp/crash
mkdir -p $WWW $C
head -c $((128 << 20)) /dev/urandom > $WWW/disk.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
FIO="fio --ioengine=io_uring --direct=1 --bs=4k --iodepth=16 --randrepeat=1"
# Large enough that fio is still in its write phase at the kill (2 s in).
SIZE=48M

# under_fio NAME ADD-ARGS...: fio randwrite --verify over $SIZE (no FLUSH
# until its end), kill -9 of the server in the write phase, recover; fio then
# completes and verifies every block it wrote.
under_fio() {
    local name=$1; shift
    section "$name: kill -9 under fio --verify, recover"
    if ! add "$@" --recovery; then fail "$name: add --recovery" "$DEV_JSON"; return; fi
    $FIO --name=crash --filename=$DEV_B --rw=randwrite --size=$SIZE --randseed=11 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio-crash.txt >/dev/null 2>&1 &
    local fio=$! old=$DEV_PID
    sleep 2
    if ! alive $fio; then fail "$name: fio still writing at the kill" "$(tail -n 5 /tmp/fio-crash.txt)"; fi
    kill -9 $old
    check "$name: the server died" wait_for 5 dead $old
    check "$name: its page states are on /run" bash -c "ls /run/ublk-http/live/ | grep -q ."
    local r
    r=$(timeout 60 "$UBLK" recover -n $DEV_ID 2>&1)
    if [ $? -eq 0 ]; then ok "$name: recover"; else fail "$name: recover" "$r"; fi
    check "$name: fio completes" wait_for 300 dead $fio
    wait $fio; local rc=$?
    eq "$name: fio verified every block it wrote (exit 0)" 0 "$rc"
    check "$name: fio reports no errors" grep -q 'err= 0' /tmp/fio-crash.txt
    grep -q 'err= 0' /tmp/fio-crash.txt || tail -n 20 /tmp/fio-crash.txt
    # The bytes survive a clean restart as well (the adopted states were persisted).
    check "$name: del" del $DEV_ID
    if add "$@"; then
        check "$name: after del and add, fio verifies again" $FIO --name=crash --filename=$DEV_B --rw=randwrite --size=$SIZE \
            --randseed=11 --verify=crc32c --verify_only=1 --verify_fatal=1 --output=/tmp/fio-again.txt
        del $DEV_ID >/dev/null
    else
        fail "$name: add again" "$DEV_JSON"
    fi
}

# plain NAME ADD-ARGS...: unflushed O_DIRECT writes of known bytes, kill -9,
# del, add again (no --recovery): the bytes read back.
plain() {
    local name=$1; shift
    section "$name: unflushed writes, kill -9, del, add again"
    if ! add "$@"; then fail "$name: add" "$DEV_JSON"; return; fi
    head -c $((4 << 20)) /dev/urandom > /tmp/pattern
    check "$name: write 4 MiB as 1024 O_DIRECT 4k writes, no FLUSH" dd if=/tmp/pattern of=$DEV_B bs=4k seek=259 oflag=direct
    kill -9 $DEV_PID; wait_for 10 dead $DEV_PID
    del $DEV_ID >/dev/null 2>&1
    if add "$@"; then
        check "$name: every acknowledged write reads back" bash -c \
            "cmp <(dd if=$DEV_B bs=4k skip=259 count=1024 iflag=direct 2>/dev/null) /tmp/pattern"
        del $DEV_ID >/dev/null
    else
        fail "$name: add again" "$DEV_JSON"
    fi
}

under_fio "http --writable" -t http --url $URL --cache $C/h.cache --bitmap $C/h.bitmap --writable
truncate -s 128M /var/tmp/through.img
under_fio "cache through" -t cache --backing /var/tmp/through.img --cache $C/t.cache --bitmap $C/t.bitmap --write-mode through
truncate -s 128M /var/tmp/back.img
under_fio "cache back" -t cache --backing /var/tmp/back.img --cache $C/b.cache --bitmap $C/b.bitmap --write-mode back

plain "http --writable" -t http --url $URL --cache $C/h.cache --bitmap $C/h.bitmap --writable
plain "cache back" -t cache --backing /var/tmp/back.img --cache $C/b.cache --bitmap $C/b.bitmap --write-mode back

# Two overlay devices of one image's shared base at once: fio --verify on
# both, kill -9 of both servers in the write phase, recover both; then del
# and add again (the overlays are reattached by name). The base is not
# killed: it holds no written page.
section "two overlay devices of one base: kill -9 under fio --verify, recover"
OVO="--url $URL --cache $C/ob.cache --bitmap $C/ob.bitmap --overlay-dir $C/ov"
mkdir -p $C/ov
OIDS=() OPIDS=() OFIOS=()
for n in 1 2; do
    if add -t http $OVO --overlay f$n --recovery; then OIDS+=($DEV_ID); OPIDS+=($DEV_PID); else fail "overlay f$n: add --recovery" "$DEV_JSON"; fi
done
if [ ${#OIDS[@]} -eq 2 ]; then
    OBASE=$("$UBLK" list -n ${OIDS[0]} | jq -r '.[0].target_options.lower' | sed 's|/dev/ublkb||')
    for n in 0 1; do
        $FIO --name=ov$n --filename=/dev/ublkb${OIDS[$n]} --rw=randwrite --size=$SIZE --randseed=$((21 + n)) \
            --verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio-ov$n.txt >/dev/null 2>&1 &
        OFIOS+=($!)
    done
    sleep 2
    for n in 0 1; do alive ${OFIOS[$n]} || fail "overlay $n: fio still writing at the kill" "$(tail -n 5 /tmp/fio-ov$n.txt)"; done
    kill -9 ${OPIDS[@]}
    for n in 0 1; do check "overlay $n: the server died" wait_for 5 dead ${OPIDS[$n]}; done
    for n in 0 1; do
        r=$(timeout 60 "$UBLK" recover -n ${OIDS[$n]} 2>&1)
        if [ $? -eq 0 ]; then ok "overlay $n: recover"; else fail "overlay $n: recover" "$r"; fi
    done
    for n in 0 1; do
        check "overlay $n: fio completes" wait_for 300 dead ${OFIOS[$n]}
        wait ${OFIOS[$n]}; eq "overlay $n: fio verified every block it wrote (exit 0)" 0 $?
        grep -q 'err= 0' /tmp/fio-ov$n.txt || tail -n 20 /tmp/fio-ov$n.txt
    done
    for n in 0 1; do check "overlay $n: del" del ${OIDS[$n]}; done
    for n in 0 1; do
        if add -t http $OVO --overlay f$((n + 1)); then
            check "overlay $n: after del and add, fio verifies again" $FIO --name=ov$n --filename=$DEV_B --rw=randwrite \
                --size=$SIZE --randseed=$((21 + n)) --verify=crc32c --verify_only=1 --verify_fatal=1 --output=/tmp/fio-ov-again.txt
            del $DEV_ID >/dev/null
        else
            fail "overlay $n: add again" "$DEV_JSON"
        fi
    done
    del $OBASE >/dev/null
fi

plain "overlay" -t http $OVO --overlay p1
"$UBLK" del -a >/dev/null 2>&1

section "a clean del leaves nothing behind on /run"
eq "no live files left" "" "$(ls /run/ublk-http/live/ 2>/dev/null)"
eq "nothing left" "[]" "$("$UBLK" list)"
nginx-stop
finish
