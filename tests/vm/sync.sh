# On the real driver: `sync` and the control protocol.
# A writable http overlay with 20,000 separate dirty extents: the control reply
# (~1 MB) arrives whole; clients that stall, never read or disconnect midway do
# not hurt the server; a `sync` killed with kill -9 midway, or whose server is
# killed midway, leaves every page dirty, and the next `sync` makes an exact replica.
source /tests/lib.sh
set -o pipefail
SECONDS=0
section() { echo; echo "# [${SECONDS}s] $*"; }

WWW=/srv/www; C=/var/tmp/sy
mkdir -p $WWW $C
# Zeros, sparse: the device reads zeros where nothing was written, and so does a
# sparse replica, so that `cmp` of the two checks exactly what `sync` copied.
truncate -s 96M $WWW/disk.img
check "nginx" nginx-start $WWW 8080
URL=http://127.0.0.1:8080/disk.img
OPTS="--url $URL --cache $C/d.cache --bitmap $C/d.bitmap --writable"
R=/tmp/replica.img   # tmpfs: st_blocks shows how far a copy got
N=12000
pages() { "$UBLK" dirty -n $DEV_ID | jq -r .pages; }
# A raw client: curl's gopher over the UNIX socket sends the selector and then
# CRLF (a second write), and reads the reply to EOF. The selector has no newline
# of its own: the server could then answer and close before the CRLF, and curl
# would die of EPIPE sending it. The request line thus ends in CR LF.
GOPHER='gopher://x/_%7B%22op%22%3A%22dirty%22%7D'
raw_dirty() { curl -s --unix-socket /run/ublk-http/ublk$DEV_ID.sock "$GOPHER"; }
answers() { timeout 60 "$UBLK" dirty -n $DEV_ID | jq -e ".extents | length == $N" >/dev/null; }
serves_io() { timeout 60 dd if=$DEV_B of=/dev/null bs=1M count=4 skip=60 iflag=direct 2>/dev/null; }
blocks() { stat -c %b $R 2>/dev/null || echo 0; }

if ! add -t http $OPTS; then
    fail "add --writable" "$DEV_JSON"; nginx-stop; finish; exit 1
fi

# The image once, in big runs: the comparisons below then read only the cache
# (a page between two written ones would otherwise be a Range GET of its own).
check "cache the image" dd if=$DEV_B of=/dev/null bs=4M iflag=direct

section "$N separate dirty extents: the reply arrives whole"
T0=$(date +%s)
check "fio writes every other 4 KiB page" fio --name=ext --filename=$DEV_B --rw=write:4k --bs=4k \
    --number_ios=$N --size=96M --direct=1 --ioengine=io_uring --iodepth=32 --output=/dev/null
echo "# fio took $(( $(date +%s) - T0 ))s"
"$UBLK" dirty -n $DEV_ID > /tmp/dirty.json 2>/tmp/dirty.err
echo "# the reply is $(wc -c < /tmp/dirty.json) bytes"
eq "dirty lists $N extents" $N "$(jq '.extents | length' /tmp/dirty.json)"
eq "and $N pages" $N "$(jq -r .pages /tmp/dirty.json)"
eq "the first extent" "0 4096" "$(jq -r '.extents[0] | "\(.offset) \(.length)"' /tmp/dirty.json)"
eq "the last extent" "$(( (2 * N - 2) * 4096 )) 4096" "$(jq -r '.extents[-1] | "\(.offset) \(.length)"' /tmp/dirty.json)"
same_raw() { cmp -s <(raw_dirty) /tmp/dirty.json; }
check "the raw reply is the same, byte for byte" same_raw

section "clients that stall, never read or disconnect midway do not hurt the server"
# Clients that never read: their output goes to a FIFO nobody reads. (The bound
# of 64 held connections is shown by the host tests: 70 curls are slow under TCG.)
mkfifo /tmp/stuck; exec 7<>/tmp/stuck
STUCK=()
for i in $(seq 8); do
    curl -s --unix-socket /run/ublk-http/ublk$DEV_ID.sock "$GOPHER" > /tmp/stuck 2>/dev/null &
    STUCK+=($!)
done
# The server's sockets on the control path: the listener and each connection held.
held() { grep -c "ublk$DEV_ID.sock" /proc/net/unix; }
holds_at_least() { [ "$(held)" -ge "$1" ]; }
check "the server holds the stuck clients" wait_for 60 holds_at_least 9
# A client that reads nothing until told to: curl fills the pipe, then the server's socket.
rm -f /tmp/go
raw_dirty | { while [ ! -e /tmp/go ]; do sleep 0.1; done; cat > /tmp/stalled.json; } &
STALLED=$!
sleep 1
check "dirty answers while clients are stuck" answers
check "the device serves I/O meanwhile" serves_io
check "a write meanwhile (to a dirty page)" dd if=/dev/urandom of=$DEV_B bs=4096 seek=2 count=1 oflag=direct
for i in 1 2 3; do raw_dirty | head -c 1000 > /dev/null; done
check "clients that disconnect midway: the server lives" alive $DEV_PID
kill -9 "${STUCK[@]}" 2>/dev/null; wait "${STUCK[@]}" 2>/dev/null; exec 7>&-
check "stuck clients killed: the server lives" alive $DEV_PID
touch /tmp/go; wait $STALLED
check "the stalled client, once it reads, gets the whole reply" jq -e ".extents | length == $N" /tmp/stalled.json
check "dirty still answers" answers
only_listening() { [ "$(held)" -eq 1 ]; }
check "and lets its connections go" wait_for 30 only_listening

section "a sync killed with kill -9 midway leaves every page dirty"
rm -f $R
"$UBLK" sync -n $DEV_ID --to $R > /tmp/sync1.json 2>&1 &
SP=$!
wait_for 120 bash -c "[ \$(stat -c %b $R 2>/dev/null || echo 0) -ge 2048 ] || ! kill -0 $SP"
kill -STOP $SP 2>/dev/null
B=$(blocks)
echo "# the replica had $B blocks of 512 when the sync was stopped"
if ! dead $SP && [ "$B" -lt $(( N * 8 )) ]; then
    ok "the sync is midway"
else
    fail "the sync is midway" "it ended first: $(cat /tmp/sync1.json)"
fi
kill -9 $SP; wait $SP 2>/dev/null
eq "every page is still dirty" $N "$(pages)"

section "a sync whose server is killed midway leaves every page dirty"
B0=$(blocks)
"$UBLK" sync -n $DEV_ID --to $R > /tmp/sync2.json 2>&1 &
SP=$!
# The copy goes over the first pages again (same bytes) before it passes B0.
wait_for 120 bash -c "[ \$(stat -c %b $R) -ge $((B0 + 2048)) ] || ! kill -0 $SP"
kill -STOP $SP 2>/dev/null
if ! dead $SP; then ok "the second sync is midway"; else fail "the second sync is midway" "$(cat /tmp/sync2.json)"; fi
# Longer than the server's persist interval (1 s): a clear made at sync-begin would be on disk now.
sleep 2.5
kill -9 $DEV_PID; wait_for 10 dead $DEV_PID
kill -9 $SP; wait $SP 2>/dev/null
del $DEV_ID >/dev/null 2>&1
if add -t http $OPTS; then
    eq "every page is still dirty after the restart" $N "$(pages)"

    section "the next sync makes an exact replica"
    S=$("$UBLK" sync -n $DEV_ID --to $R)
    eq "sync copied every extent" $N "$(echo "$S" | jq -r .extents)"
    eq "sync copied every page" $((N * 4096)) "$(echo "$S" | jq -r .bytes)"
    eq "nothing dirty after the sync" 0 "$(pages)"
    check "replica equals the device" cmp $DEV_B $R

    section "a sync-end with an unknown token is refused; its pages stay dirty"
    check "write a page" dd if=/dev/urandom of=$DEV_B bs=4096 seek=7 count=1 oflag=direct
    # More than 16 syncs begun and never ended drop the oldest snapshot.
    for i in $(seq 17); do
        curl -s --unix-socket /run/ublk-http/ublk$DEV_ID.sock 'gopher://x/_%7B%22op%22%3A%22sync-begin%22%7D' > /tmp/begin.$i.json
    done
    TOKEN=$(jq -r .token /tmp/begin.1.json)
    END=$(curl -s --unix-socket /run/ublk-http/ublk$DEV_ID.sock "gopher://x/_%7B%22op%22%3A%22sync-end%22%2C%22ok%22%3Atrue%2C%22token%22%3A$TOKEN%7D")
    eq "the oldest token is refused" true "$(echo "$END" | jq '.error | test("unknown sync token")')"
    eq "its page is still dirty" 1 "$(pages)"
    TOKEN=$(jq -r .token /tmp/begin.17.json)
    END=$(curl -s --unix-socket /run/ublk-http/ublk$DEV_ID.sock "gopher://x/_%7B%22op%22%3A%22sync-end%22%2C%22ok%22%3Atrue%2C%22token%22%3A$TOKEN%7D")
    eq "the newest token clears it" 1 "$(echo "$END" | jq -r .pages_cleared)"
    eq "nothing dirty" 0 "$(pages)"
    check "del" del $DEV_ID
else
    fail "add after the server was killed" "$DEV_JSON"
fi

echo "# [${SECONDS}s] done"
nginx-stop
finish
