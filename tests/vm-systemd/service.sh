# The host service under a real systemd (vm/run-systemd.sh: a Debian guest
# with systemd as PID 1, the .deb installed in its first boot). Runs in each
# boot with UBLK_TEST_BOOT=1, 2 and keeps what the next boot checks in
# $UBLK_TEST_STATE.
#   boot 1: the units verify; a table with an http device (mounted from
#           fstab) and an overlay over it; both up, the image read whole;
#           data written to the overlay; reboot.
#   boot 2: both back, the mount there, nothing fetched twice, the overlay's
#           data kept; kill -9 under fio --verify (systemd restarts, the device
#           recovers, one restart counted); metrics; systemctl stop, down and up
#           by name; a broken table line; the udev name across a re-add with
#           another number; purge.
source /opt/ublk-test/lib.sh
UBLK=/usr/sbin/ublk-http
S=$UBLK_TEST_STATE
TAB=/etc/ublk-http/ublktab
IMG_URL=http://127.0.0.1:8080/root.img
FIO_V=(--name=v --filename=/dev/ublk-http/vm1 --rw=randwrite --bs=4k --size=24M --ioengine=libaio --iodepth=16
       --direct=1 --verify=crc32c --verify_fatal=1 --randseed=7)

# name_field NAME FIELD: a field of the device NAME in `list`.
name_field() { "$UBLK" list | jq -r --arg n "$1" ".[] | select(.name == \$n) | .$2"; }
# stat_of NAME KEY: a counter of its stats (JSON).
stat_of() { local id; id=$(name_field "$1" dev_id); "$UBLK" stats -n "$id" --json | jq -r ".$2"; }
hydrated() { [ "$(name_field "$1" hydrated_percent | cut -d. -f1)" = 100 ]; }
unit_active() { [ "$(systemctl is-active "$1")" = active ]; }

if [ "$UBLK_TEST_BOOT" = 1 ]; then
    section "boot 1: the package"
    check "systemd is PID 1" grep -qx systemd /proc/1/comm
    for f in /usr/sbin/ublk-http /usr/lib/systemd/system/ublk-http@.service /usr/lib/systemd/system/ublk-http.target \
             /usr/lib/systemd/system-generators/ublk-http-generator /usr/lib/udev/rules.d/60-ublk-http.rules \
             /usr/lib/modules-load.d/ublk-http.conf /etc/ublk-http/ublktab; do
        check "installed: $f" test -e "$f"
    done
    check "ublk_drv loaded at install" test -e /dev/ublk-control
    check "the metrics timer is enabled" systemctl is-enabled ublk-http-metrics.timer
    check "installed: the man page" bash -c "dpkg -L ublk-http | grep -qx /usr/share/man/man8/ublk-http.8.gz"
    # --man=no: the guest has no man(1) to look the page up with.
    out=$(systemd-analyze verify --man=no /usr/lib/systemd/system/ublk-http@.service /usr/lib/systemd/system/ublk-http.target \
          /usr/lib/systemd/system/ublk-http-metrics.service /usr/lib/systemd/system/ublk-http-metrics.timer 2>&1 | grep -v '^$')
    eq "systemd-analyze verify is clean" "" "$out"

    section "boot 1: an image, a table, fstab"
    mkdir -p /srv/img/tree /mnt/root
    head -c 3M /dev/urandom > /srv/img/tree/data.bin
    seq 1 20000 > /srv/img/tree/numbers.txt
    /usr/sbin/mkfs.ext4 -q -F -d /srv/img/tree -L root /srv/img/root.img 48M
    # The image server, in a unit of its own: Debian's nginx.service is ordered after
    # remote-fs.target, which waits for the mount on the device, which waits for it.
    systemctl disable --now nginx.service >/dev/null 2>&1
    mkdir -p /etc/ublk-test
    cat > /etc/ublk-test/nginx.conf <<'EOF'
events {}
pid /run/ublk-test-nginx.pid;
http { access_log off; server { listen 127.0.0.1:8080; root /srv/img; } }
EOF
    cat > /etc/systemd/system/image-server.service <<'EOF'
[Unit]
Description=the test's image server
DefaultDependencies=no
After=network.target
[Service]
ExecStart=/usr/sbin/nginx -g 'daemon off;' -c /etc/ublk-test/nginx.conf
[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable --now image-server.service >/dev/null 2>&1
    # The previous boot's journal, for boot 2 to read.
    mkdir -p /var/log/journal && systemctl restart systemd-journald && journalctl --flush
    check "nginx serves the image" curl -sfI "$IMG_URL"
    # The image server runs here: order the device after it.
    mkdir -p /etc/systemd/system/ublk-http@root.service.d
    printf '[Unit]\nWants=image-server.service\nAfter=image-server.service\n' > /etc/systemd/system/ublk-http@root.service.d/image-server.conf
    cat >> "$TAB" <<EOF
root  http     $IMG_URL  connections=4
vm1   overlay  root      -
EOF
    echo "/dev/ublk-http/root /mnt/root ext4 ro,_netdev,x-systemd.requires=ublk-http@root.service 0 0" >> /etc/fstab
    check "check: the table is good" "$UBLK" check
    out=$("$UBLK" up 2>&1); rc=$?
    eq "up: both devices (via systemd)" "0 2" "$rc $(echo "$out" | grep -c '"name"')"
    check "ublk-http@root is active" unit_active ublk-http@root.service
    check "ublk-http@vm1 is active" unit_active ublk-http@vm1.service
    check "udev name root" wait_for 10 test -b /dev/ublk-http/root
    check "udev name vm1" wait_for 10 test -b /dev/ublk-http/vm1
    eq "root's name points at its device" "$(name_field root block_device)" "$(readlink -f /dev/ublk-http/root)"
    systemctl daemon-reload
    check "fstab mount" mount /mnt/root
    check "the mounted image is right" cmp /mnt/root/data.bin /srv/img/tree/data.bin
    systemd-analyze security --no-pager ublk-http@root.service | tail -n 1 | sed 's/^/    security: /'
    cat /dev/ublk-http/root > /dev/null
    # The statistics are published once a second.
    check "root hydrated by reading it whole" wait_for 10 hydrated root
    check "write to the overlay" fio "${FIO_V[@]}" --do_verify=0
    systemctl is-enabled ublk-http.target > "$S/target-enabled"
    echo "$PASS $FAIL" > "$S/boot1"
    finish > "$S/boot1.summary" || true
    cat "$S/boot1.summary"
    section "boot 1: reboot"
    systemctl reboot
    exit 0
fi

section "boot 2: back after the reboot"
read -r PASS FAIL < "$S/boot1"
[ "$FAIL" = 0 ] || FAILED_NAMES+=("(boot 1: see above)")
check "ublk-http.target was enabled" grep -qx enabled "$S/target-enabled"
check "ublk-http@root came back" unit_active ublk-http@root.service
check "ublk-http@vm1 came back" unit_active ublk-http@vm1.service
check "the fstab mount is there" findmnt -n /mnt/root
# The reboot stopped the mount before its device: the kernel never shut the file system down.
eq "the last shutdown unmounted before removing the device" 0 "$(journalctl -k -b -1 | grep -c 'shut down requested')"
journalctl -b -1 -o short-monotonic --no-pager -u ublk-http@root.service -u mnt-root.mount -u ublk-http@vm1.service \
    | tail -n 25 | sed 's/^/    /'
check "the mounted image is right" cmp /mnt/root/data.bin /srv/img/tree/data.bin
cat /dev/ublk-http/root > /dev/null
sleep 1.5  # the statistics are published once a second
eq "nothing fetched twice (bytes fetched this boot)" 0 "$(stat_of root bytes_fetched)"
check "the overlay kept its data" fio "${FIO_V[@]}" --verify_only

section "boot 2: kill -9 under fio --verify"
pid0=$(name_field vm1 pid)
fio "${FIO_V[@]}" --randseed=8 --do_verify=1 > /tmp/fio.log 2>&1 &
fio_pid=$!
sleep 3
kill -9 "$pid0"
wait "$fio_pid"
eq "fio ends with no error" 0 "$?"
grep -E "err=|verify" /tmp/fio.log | head -n 3 | sed 's/^/    /'
check "systemd restarted the unit" wait_for 30 unit_active ublk-http@vm1.service
eq "systemd counts one restart" NRestarts=1 "$(systemctl show -p NRestarts ublk-http@vm1.service)"
eq "list shows one restart" 1 "$(name_field vm1 restarts)"
check "a new server" test "$(name_field vm1 pid)" != "$pid0"

section "boot 2: metrics"
mkdir -p /var/lib/prometheus/node-exporter
check "the metrics unit runs" systemctl start ublk-http-metrics.service
M=/var/lib/prometheus/node-exporter/ublk-http.prom
# A strict reading of the text format: every sample's family declared by one
# TYPE line before it, names and labels well-formed, values numbers.
bad=$(awk '
    /^# HELP / { next }
    /^# TYPE / { if ($3 in typed) { print "TYPE twice: " $3 }; typed[$3] = 1; next }
    /^#/ { print "stray comment: " $0; next }
    {
        if ($0 !~ /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*")*\})? [-+]?([0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|NaN|[+-]Inf)$/) { print "bad line: " $0; next }
        n = $0; sub(/[{ ].*/, "", n)
        if (!(n in typed)) print "undeclared: " n
        samples++
    }
    END { if (samples < 10) print "only " samples " samples" }' "$M")
eq "the metrics file parses strictly" "" "$bad"
check "metrics: vm1 restarted once" grep -qx 'ublk_http_server_restarts_total{name="vm1",device="ublkb[0-9]*"} 1' "$M"
check "metrics: root is LIVE" grep -q '^ublk_http_device_state{name="root",device="ublkb[0-9]*",state="LIVE"} 1$' "$M"
check "metrics: root hydrated" grep -q '^ublk_http_hydrated_ratio{name="root",device="ublkb[0-9]*"} 1' "$M"
check "metrics: root's hits" grep -q '^ublk_http_cache_hits_total{name="root",' "$M"

section "boot 2: stop, down and up by name"
systemctl stop ublk-http@vm1.service
check "stopped: /dev/ublk-http/vm1 is gone" wait_for 10 gone /dev/ublk-http/vm1
eq "stopped: no device named vm1" "" "$(name_field vm1 dev_id)"
check "stopped: the overlay is kept" test -s /var/lib/ublk-http/overlays/vm1.overlay
out=$("$UBLK" up vm1 2>&1)
check "up vm1" unit_active ublk-http@vm1.service
check "up: its data" fio "${FIO_V[@]}" --randseed=8 --verify_only
check "down vm1" "$UBLK" down vm1
check "down: gone" wait_for 10 gone /dev/ublk-http/vm1
check "down: the unit stopped" test "$(systemctl is-active ublk-http@vm1.service)" != active

section "boot 2: a broken table line"
cp "$TAB" /tmp/ublktab.good
echo "tape0 tape /dev/st0" >> "$TAB"
line=$(wc -l < "$TAB")
out=$("$UBLK" check 2>&1); rc=$?
eq "check fails" 1 "$rc"
eq "check names the line" "$TAB:$line: unknown target 'tape' (known: null, loop, http, cache, overlay)" "$out"

section "boot 2: the udev name across a re-add with another number"
old=$(readlink -f /dev/ublk-http/root)
check "up vm1 with a broken line elsewhere" "$UBLK" up vm1
n1=$(name_field vm1 dev_id)
check "down vm1" "$UBLK" down vm1
add -t null --size 1M -n "$n1" >/dev/null
check "up vm1" "$UBLK" up vm1
n2=$(name_field vm1 dev_id)
check "vm1 has another number" test "$n1" != "$n2"
eq "/dev/ublk-http/vm1 follows it" "/dev/ublkb$n2" "$(readlink -f /dev/ublk-http/vm1)"
check "and no name on the null device" test -z "$(udevadm info -q symlink "/dev/ublkb$n1" | grep ublk-http)"
del "$n1"
eq "root kept its name" "$old" "$(readlink -f /dev/ublk-http/root)"
cp /tmp/ublktab.good "$TAB"

section "boot 2: remove, then purge"
umount /mnt/root
sed -i '\|/dev/ublk-http/root|d' /etc/fstab
check "apt-get remove" apt-get remove -y -q ublk-http
check "removed: no ublk device left" test -z "$(ls /dev | grep '^ublkb')"
check "removed: the units are gone" gone /usr/lib/systemd/system/ublk-http@.service
check "removed: the caches are kept" test -s /var/cache/ublk-http/root.bitmap
check "removed: the table is kept" grep -q '^root ' "$TAB"
check "apt-get purge" apt-get purge -y -q ublk-http
for f in /usr/lib/systemd/system/ublk-http@.service /usr/lib/udev/rules.d/60-ublk-http.rules /usr/sbin/ublk-http \
         /etc/ublk-http /var/cache/ublk-http; do
    check "purged: $f" gone "$f"
done
check "no unit left loaded" test -z "$(systemctl list-units --all --no-legend 'ublk-http*' | grep -v 'not-found')"
finish
