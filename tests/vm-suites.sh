#!/usr/bin/env bash
# Guest side of tests/vm.sh: runs the suites named as arguments
# (/tests/NAME.sh) one after the other in one boot, so that a CI run boots the
# VM a few times rather than once per suite. Each suite runs in its own bash;
# between two, the guest is put back as a fresh boot has it: no ublk device
# or server, no nginx, nothing mounted under /mnt, no device-mapper or loop
# device, no RAM disk (brd is loaded again with each suite's own sizes), and
# empty /tmp, /var/tmp, /srv, /run/ublk-http and nginx logs.
# Prints "@@SUITE NAME STATUS SECONDS@@" after each; exits 1 if any failed.
UBLK=/usr/local/bin/ublk-http

uptime_s() { cut -d' ' -f1 /proc/uptime; }

reset_guest() {
    local id
    for id in $("$UBLK" list 2>/dev/null | jq -r '.[].dev_id' 2>/dev/null); do timeout 60 "$UBLK" del -n "$id" >/dev/null 2>&1; done
    pkill -9 -x ublk-http 2>/dev/null
    for id in $(ls /dev 2>/dev/null | sed -n 's/^ublkc\([0-9]*\)$/\1/p'); do timeout 60 "$UBLK" del -n "$id" >/dev/null 2>&1; done
    nginx-stop >/dev/null 2>&1
    awk '$2 ~ "^/mnt/" { print $2 }' /proc/mounts | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
    command -v dmsetup >/dev/null && dmsetup --noudevsync remove_all >/dev/null 2>&1
    losetup -D 2>/dev/null
    local m
    for m in dm_delay dm_flakey brd; do [ -e /sys/module/$m/initstate ] && rmmod $m 2>/dev/null; done
    # The suites' files (cwd is /tmp: its contents go, the directory stays).
    rm -rf /tmp/* /tmp/.[!.]* /var/tmp/* /srv/* /run/ublk-http /mnt/* 2>/dev/null
    : >/var/log/nginx/access.log 2>/dev/null; : >/var/log/nginx/error.log 2>/dev/null
    cp /etc/hosts.boot /etc/hosts 2>/dev/null
}

cp /etc/hosts /etc/hosts.boot 2>/dev/null
rc=0 first=1
for s in "$@"; do
    [ $first = 1 ] || reset_guest
    first=0
    echo "@@SUITE-START $s@@"
    t0=$(uptime_s)
    # Its own process group (setsid): what it left running in the background
    # (a fio on a deleted device, a polling loop) is killed with it, not left
    # to slow the suites after it.
    (cd /tmp && exec setsid bash "/tests/$s.sh") </dev/null &
    pid=$!
    wait $pid
    r=$?
    left=$(pgrep -g "$pid" | wc -l)
    [ "$left" -gt 0 ] && echo "# $s left $left processes running: $(pgrep -g "$pid" -l | awk '{ print $2 }' | sort | uniq -c | tr -s ' \n' ' ')(killed)"
    kill -9 -- "-$pid" 2>/dev/null
    echo "@@SUITE $s $r $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.0f", b - a }')@@"
    [ $r -eq 0 ] || rc=1
done
exit $rc
