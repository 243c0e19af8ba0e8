# On the real driver: secrets (a --header-file, a
# presigned query string) appear nowhere another user can read them (the
# server's /proc/PID/cmdline, files under /run/ublk-http/, `list`, the logs);
# bad numbers and crafted input are one line on stderr and a non-zero exit;
# a name that fails to resolve for a moment is retried.
source /tests/lib.sh
set -o pipefail

WWW=/srv/www; CACHE=/var/tmp/ublk-cache; RUN=/run/ublk-http
mkdir -p $WWW $CACHE
head -c $((8 << 20)) /dev/urandom > $WWW/disk.img
check "nginx" nginx-start $WWW 8080
LOG=/var/log/nginx/access.log
# nginx ignores the query; its log shows what the server really sent (request line, User-Agent).
URL="http://127.0.0.1:8080/disk.img?X-Amz-Credential=AKIDSECRET&X-Amz-Signature=SECRETSIG"
SHOWN="http://127.0.0.1:8080/disk.img?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"
printf '# secrets\nAuthorization: Bearer SECRETTOKEN\nUser-Agent: ublk-test-SECRETUA\n' > /tmp/headers
chmod 600 /tmp/headers
SECRETS='SECRETTOKEN|SECRETSIG|SECRETUA|AKIDSECRET'
nobody() { /usr/local/bin/setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
# no_secret NAME TEXT: TEXT holds none of the secrets.
no_secret() {
    local hit
    hit=$(printf '%s' "$2" | grep -oE "$SECRETS" | sort -u | tr '\n' ' ')
    if [ -z "$hit" ]; then ok "$1"; else fail "$1" "found: $hit"; fi
}
# server_clean WHAT: the running server's cmdline, state files and logs hold no secret.
server_clean() {
    no_secret "$1: /proc/PID/cmdline (read by another user) has no secret" "$(nobody cat /proc/$DEV_PID/cmdline | tr '\0' ' ')"
    check "$1: its cmdline shows the redacted URL" bash -c "tr '\0' '\n' < /proc/$DEV_PID/cmdline | grep -qxF '$SHOWN'"
    no_secret "$1: no file under $RUN that another user can read holds a secret" \
        "$(nobody grep -rhoE "$SECRETS" $RUN 2>/dev/null)"
    eq "$1: ublk$DEV_ID.args (the arguments for recover) is 0600" 600 "$(stat -c %a $RUN/ublk$DEV_ID.args)"
    eq "$1: the logs are 0600" "600 600" "$(stat -c %a $RUN/server.log $RUN/ublk$DEV_ID.log | tr '\n' ' ' | sed 's/ $//')"
    no_secret "$1: the logs hold no secret" "$(cat $RUN/*.log)"
    L=$("$UBLK" list -n $DEV_ID)
    no_secret "$1: list has no secret" "$L"
    eq "$1: list shows the redacted URL" "$SHOWN" "$(echo "$L" | jq -r '.[0].target_options.url')"
}

section "secrets: add -t http with a presigned URL and a --header-file"
rm -f $CACHE/s.*
if add -t http --url "$URL" --header-file /tmp/headers --cache $CACHE/s.cache --bitmap $CACHE/s.bitmap \
    --readahead 0 --recovery; then
    ok "add with --header-file and a presigned URL"
    no_secret "add's JSON has no secret" "$DEV_JSON"
    check "the first MiB reads right" cmp -n $((1 << 20)) $DEV_B $WWW/disk.img
    check "the server sent the real query" grep -q "disk.img?X-Amz-Credential=AKIDSECRET&X-Amz-Signature=SECRETSIG" $LOG
    check "and the headers of the file" grep -q '"ublk-test-SECRETUA"' $LOG
    # A failed fetch is logged (with the URL) by the server.
    mv $WWW/disk.img $WWW/away.img
    check "a read of a missing page fails (the object is gone)" bash -c "! dd if=$DEV_B of=/dev/null bs=4k skip=1536 count=1 iflag=direct 2>/dev/null"
    mv $WWW/away.img $WWW/disk.img
    check "the failure is in the server's log, its URL redacted" grep -qF "$SHOWN" $RUN/ublk$DEV_ID.log
    server_clean "server"
    # recover starts a new server with the saved arguments: they must still be the real ones.
    OLD=$DEV_PID
    kill -9 $DEV_PID
    wait_for 20 dead $OLD
    R=$(timeout 60 "$UBLK" recover -n $DEV_ID 2>&1)
    if [ $? -eq 0 ]; then ok "recover -n"; else fail "recover -n" "$R"; fi
    no_secret "recover's JSON has no secret" "$R"
    DEV_PID=$(echo "$R" | jq -r .pid 2>/dev/null)
    HEADS=$(grep -c 'HEAD /disk.img?X-Amz-Credential=AKIDSECRET&X-Amz-Signature=SECRETSIG.*ublk-test-SECRETUA' $LOG)
    check "the recovered server probed with the real URL and headers" test "$HEADS" -ge 2
    check "the whole device reads right" cmp $DEV_B $WWW/disk.img
    server_clean "recovered server"
    check "del" del $DEV_ID
    check "del removes the arguments file" test ! -e $RUN/ublk$DEV_ID.args
else
    fail "add with --header-file and a presigned URL" "$DEV_JSON"
fi

section "secret files"
chmod 644 /tmp/headers
expect_error "a --header-file others can read is refused" "readable by every user" \
    "$UBLK" add -t http --url "$URL" --header-file /tmp/headers --cache $CACHE/s.cache --bitmap $CACHE/s.bitmap
printf 'Authorization: Bearer SECRETTOKEN\r\n' > /tmp/crlf; chmod 600 /tmp/crlf
expect_error "a header file with CR LF: line named, value not shown" "line 1: the value of 'Authorization' contains a line break" \
    "$UBLK" add -t http --url "$URL" --header-file /tmp/crlf
no_secret "that error shows no secret" "$(cat /tmp/.err)"
expect_error "a --header with CR LF" "line break" "$UBLK" add -t http --url "$URL" --header $'X-A: SECRETTOKEN\r\nX-B: 1'
no_secret "that error shows no secret" "$(cat /tmp/.err)"
expect_error "a URL with CR LF" "line break" "$UBLK" add -t http --url $'http://127.0.0.1:8080/disk.img\r\nX-B: 1'
expect_error "a 404 with a presigned URL: one line, query redacted" "404" "$UBLK" add -t http --url "http://127.0.0.1:8080/missing.img?X-Amz-Signature=SECRETSIG"
no_secret "that error shows no secret" "$(cat /tmp/.err)"

section "bad numbers: one line, non-zero exit"
H="$UBLK add -t http --url http://127.0.0.1:8080/disk.img --cache $CACHE/b.cache --bitmap $CACHE/b.bitmap"
for t in inf nan 1e300 0.0001 -1; do expect_error "--timeout $t" "--timeout must be between" $H --timeout $t; done
for m in 99999999999999999999G 16E; do expect_error "--cache-max-size $m" "bad --cache-max-size" $H --cache-max-size $m; done
expect_error "--page-size 8M (above the fetch size)" "page-size must be a power of two" $H --page-size 8388608
expect_error "--page-size 3000" "page-size must be a power of two" $H --page-size 3000
expect_error "--page-size 99999999999999999999" "invalid for '--page-size" $H --page-size 99999999999999999999
expect_error "--readahead 9000P" "bad --readahead" $H --readahead 9000P
for c in 0 65 99999999999999999999; do expect_error "--connections $c" "connections" $H --connections $c; done
expect_error "-q 0" "--queues must be between" "$UBLK" add -t null -q 0
expect_error "-q 65" "--queues must be between" "$UBLK" add -t null -q 65
expect_error "-d 0" "--depth must be between" "$UBLK" add -t null -d 0
expect_error "-d 4097" "--depth must be between" "$UBLK" add -t null -d 4097
expect_error "--size 16E" "bad size" "$UBLK" add -t null --size 16E
expect_error "--size 99999999999999999999G" "bad size" "$UBLK" add -t null --size 99999999999999999999G
expect_error "-n -1" "bad device id" "$UBLK" add -t null -n -1
expect_error "list -n -1" "bad device id" "$UBLK" list -n -1
expect_error "stats -n -1" "bad device id" "$UBLK" stats -n -1
expect_error "del -n 4294967296" "bad device id" "$UBLK" del -n 4294967296
truncate -s 3T $WWW/huge.img
expect_error "an image larger than the bitmap can address (2^32 pages)" "more than the 2199023255552" \
    "$UBLK" add -t http --url http://127.0.0.1:8080/huge.img --page-size 512 --cache $CACHE/h.cache --bitmap $CACHE/h.bitmap
rm -f $WWW/huge.img

section "a name that stops resolving for a moment: the read is retried, not failed"
# The name goes from /etc/hosts after add; nginx restarts (no connection to
# reuse) and the DNS cache (--dns-cache 2 s instead of 60) runs out; the name
# comes back a second after a cold read starts, within the retries' backoff.
cp /etc/hosts /tmp/hosts.orig
echo "127.0.0.1 imgserver" >> /etc/hosts
if add -t http --url http://imgserver:8080/disk.img --cache $CACHE/dns.cache --bitmap $CACHE/dns.bitmap --dns-cache 2; then
    cp /tmp/hosts.orig /etc/hosts
    nginx-stop; nginx-start $WWW 8080 >/dev/null
    sleep 3
    ( sleep 1; echo "127.0.0.1 imgserver" >> /etc/hosts ) &
    check "a cold read while the name does not resolve returns the image once it does" \
        bash -c "cmp <(dd if=$DEV_B bs=1M skip=4 count=2 iflag=direct 2>/dev/null) <(dd if=$WWW/disk.img bs=1M skip=4 count=2 2>/dev/null)"
    wait
    sleep 1.2
    R=$("$UBLK" stats -n $DEV_ID --json | jq -r .retries)
    echo "# retries: $R"
    check "the fetch was retried" test "$R" -gt 0
    check "del" del $DEV_ID
else
    fail "add -t http --url http://imgserver:8080/disk.img" "$DEV_JSON"
fi
cp /tmp/hosts.orig /etc/hosts

eq "nothing left" "[]" "$("$UBLK" list)"
nginx-stop

section "/run too small for the live words: one line at add, no SIGBUS, nothing left"
check "nginx (again)" nginx-start $WWW 8080
truncate -s 1G $WWW/big.img
mkdir -p $RUN/live
# 8 KiB: a 1 GiB image's words are 32 KiB per bitmap (present, local, dirty).
if mount -t tmpfs -o size=8k,mode=0700 tmpfs $RUN/live; then
    rm -f $CACHE/tiny.*
    expect_error "add -t http --writable with the live words too big for /run" \
        "cannot reserve [0-9]+ bytes for the live page states of .* in $RUN/live: No space left on device" \
        "$UBLK" add -t http --writable --url http://127.0.0.1:8080/big.img --cache $CACHE/tiny.cache --bitmap $CACHE/tiny.bitmap
    eq "no device left behind" "[]" "$("$UBLK" list)"
    check "no block device left" bash -c "! ls /dev/ublkb* 2>/dev/null"
    check "no live file left in the tiny /run" bash -c "[ -z \"\$(ls -A $RUN/live)\" ]"
    check "umount the tiny /run/ublk-http/live" umount $RUN/live
    # With room again, the same add works.
    if add -t http --writable --url http://127.0.0.1:8080/big.img --cache $CACHE/tiny.cache --bitmap $CACHE/tiny.bitmap; then
        ok "the same add with room in /run"
        del $DEV_ID >/dev/null
    else
        fail "the same add with room in /run" "$DEV_JSON"
    fi
else
    fail "mount a tmpfs of 8 KiB on $RUN/live"
fi
rm -f $CACHE/tiny.* $WWW/big.img
eq "nothing left after the tiny /run" "[]" "$("$UBLK" list)"
nginx-stop

section "redirects: a --header-file reaches the host of --url, never a redirect's other host"
# nginx on 127.0.0.1:8090 redirects the image to 127.0.0.2:8091 (another host on
# loopback); both log the X-Secret and Authorization headers each request carried.
RD=/run/nginx-redir RDLOG=/var/log/nginx-redir
mkdir -p $RD $RDLOG /var/lib/nginx
: > $RDLOG/named.log; : > $RDLOG/other.log
cat > $RD/nginx.conf <<CONF
user root;
worker_processes 1;
pid $RD/nginx.pid;
error_log $RDLOG/error.log warn;
events { worker_connections 64; }
http {
    log_format creds '\$server_addr "\$request" \$status "\$http_user_agent" "\$http_x_secret" "\$http_authorization"';
    client_body_temp_path /var/lib/nginx/body;
    proxy_temp_path /var/lib/nginx/proxy;
    fastcgi_temp_path /var/lib/nginx/fastcgi;
    uwsgi_temp_path /var/lib/nginx/uwsgi;
    scgi_temp_path /var/lib/nginx/scgi;
    server {
        listen 127.0.0.1:8090;
        access_log $RDLOG/named.log creds;
        location = /disk.img { return 302 http://127.0.0.2:8091/disk.img; }
    }
    server {
        listen 127.0.0.2:8091;
        access_log $RDLOG/other.log creds;
        root $WWW;
    }
}
CONF
check "nginx with two hosts" /usr/sbin/nginx -c $RD/nginx.conf
wait_for 10 curl -sf -o /dev/null -r 0-0 http://127.0.0.2:8091/disk.img
printf 'X-Secret: SECRETREDIR\nAuthorization: Bearer SECRETREDIRTOKEN\n' > /tmp/redir-headers
chmod 600 /tmp/redir-headers
RADD="-t http --url http://127.0.0.1:8090/disk.img --header-file /tmp/redir-headers --cache $CACHE/rd.cache --bitmap $CACHE/rd.bitmap --readahead 0"
rm -f $CACHE/rd.*
if add $RADD; then
    ok "add with a URL that redirects to another host"
    check "the first MiB reads right (through the redirect)" cmp -n $((1 << 20)) $DEV_B $WWW/disk.img
    check "the host of --url got the header file's headers" grep -q '"SECRETREDIR" "Bearer SECRETREDIRTOKEN"' $RDLOG/named.log
    N=$(grep -c '"ublk-http"' $RDLOG/other.log)
    check "the redirect's host was asked by ublk-http ($N requests)" test "$N" -ge 2
    eq "the redirect's host got no header of the file" 0 "$(grep -c SECRETREDIR $RDLOG/other.log)"
    check "del" del $DEV_ID
else
    fail "add with a URL that redirects to another host" "$DEV_JSON"
fi
BEFORE=$(wc -l < $RDLOG/other.log)
rm -f $CACHE/rd.*
expect_error "with --redirect-credentials refuse, add fails in one line" "redirect refused: http://127.0.0.2:8091/disk.img" \
    "$UBLK" add $RADD --redirect-credentials refuse
eq "and the redirect's host was not asked" "$BEFORE" "$(wc -l < $RDLOG/other.log)"
eq "the redirect's host never got a header of the file" 0 "$(grep -c SECRETREDIR $RDLOG/other.log)"
chmod 640 /tmp/redir-headers
expect_error "a --header-file its group can read is refused" "--header-file /tmp/redir-headers is readable by its group .*chmod 600" \
    "$UBLK" add $RADD
printf 'SECRETREDIRPW\n' > /tmp/redir-pw
chmod 660 /tmp/redir-pw
expect_error "a --password-file its group can read is refused" "--password-file /tmp/redir-pw is readable by its group .*chmod 600" \
    "$UBLK" add -t http --url http://127.0.0.1:8090/disk.img --user me --password-file /tmp/redir-pw
/usr/sbin/nginx -c $RD/nginx.conf -s quit
wait_for 10 gone $RD/nginx.pid
eq "nothing left" "[]" "$("$UBLK" list)"

finish
