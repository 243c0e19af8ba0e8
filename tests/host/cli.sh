#!/usr/bin/env bash
# Host tests of the commands that need no kernel driver: `prefetch` and
# `status` against nginx on 127.0.0.1, and S3 through moto's server mode.
# Usage: tests/host/cli.sh [UBLK-HTTP-BINARY]
source "$(dirname "${BASH_SOURCE[0]}")/../vm/lib.sh"
UBLK=$(realpath "${1:-$(dirname "${BASH_SOURCE[0]}")/../../.build/debug/ublk-http}")
W=$(mktemp -d /tmp/ublk-host-test.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; [ -f $W/nginx.pid ] && kill "$(cat $W/nginx.pid)" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

section "nginx on 127.0.0.1"
mkdir -p $W/www $W/logs $W/tmp
head -c $((6 << 20)) /dev/urandom > $W/www/img.bin
head -c 1000003 /dev/urandom >> $W/www/img.bin
PORT=$(free_port)
cat > $W/nginx.conf <<CONF
user root; daemon on; worker_processes 1; pid $W/nginx.pid; error_log $W/logs/error.log;
events { worker_connections 64; }
http { access_log $W/logs/access.log; client_body_temp_path $W/tmp; proxy_temp_path $W/tmp;
  fastcgi_temp_path $W/tmp; uwsgi_temp_path $W/tmp; scgi_temp_path $W/tmp;
  server { listen 127.0.0.1:$PORT; root $W/www; } }
CONF
check "nginx starts" /usr/sbin/nginx -c $W/nginx.conf
URL=http://127.0.0.1:$PORT/img.bin
ranges() { grep -c '"GET /img.bin HTTP/1.1" 206' $W/logs/access.log || true; }

section "prefetch and status"
check "prefetch the whole image" "$UBLK" prefetch --url $URL --cache $W/c --bitmap $W/b
check "the cache file holds the object (then its trailer)" cmp -n $(stat -c %s $W/www/img.bin) $W/c $W/www/img.bin
S=$("$UBLK" status --bitmap $W/b --cache $W/c)
eq "status: 100 percent" 100 "$(echo "$S" | jq -r .percent)"
eq "status: url" "$URL" "$(echo "$S" | jq -r .url)"
check "status: etag recorded" bash -c "echo '$S' | jq -e '.etag | length > 0'"
eq "status: image size" $(( (6 << 20) + 1000003 )) "$(echo "$S" | jq -r .image_size)"
N=$(ranges)
check "requests of at most 4 MiB: 2 for 7 MB" test "$N" -eq 2
check "prefetch again" "$UBLK" prefetch --url $URL --cache $W/c --bitmap $W/b
eq "nothing fetched again" "$N" "$(ranges)"
check "prefetch --range 0-1M into a new cache" "$UBLK" prefetch --url $URL --cache $W/c2 --bitmap $W/b2 --range 0-1M
eq "exactly the pages of the range are present" 257 "$("$UBLK" status --bitmap $W/b2 | jq -r .pages_present)"
check "those bytes are right" cmp -n $((1 << 20)) $W/c2 $W/www/img.bin
check "files are 0600" bash -c "[ \$(stat -c %a $W/c2) = 600 ] && [ \$(stat -c %a $W/b2) = 600 ]"
expect_error "prefetch of a missing object" "404" "$UBLK" prefetch --url http://127.0.0.1:$PORT/nope --cache $W/x --bitmap $W/y
expect_error "status of a missing bitmap" "No such file" "$UBLK" status --bitmap $W/none
expect_error "status of a file that is no bitmap" "bitmap|magic" "$UBLK" status --bitmap $W/www/img.bin
expect_error "a bitmap of another image" "size|bitmap" "$UBLK" prefetch --url $URL --cache $W/c3 --bitmap $W/b2 --page-size 8192

section "bad input: one line, non-zero, never a trap"
expect_error "--page-size abc (a parse error) is one line" "invalid for '--page-size" "$UBLK" prefetch --url $URL --page-size abc
expect_error "--connections 99999999999999999999 is one line" "invalid for '--connections" "$UBLK" prefetch --url $URL --connections 99999999999999999999
expect_error "--timeout inf" "--timeout must be between" "$UBLK" prefetch --url $URL --timeout inf
expect_error "--timeout -1" "--timeout must be between" "$UBLK" prefetch --url $URL --timeout -1
expect_error "--dns-cache -1" "--dns-cache must be between" "$UBLK" prefetch --url $URL --dns-cache -1
expect_error "--dns-cache 86401" "--dns-cache must be between" "$UBLK" prefetch --url $URL --dns-cache 86401
expect_error "--readahead 9000P" "bad --readahead" "$UBLK" prefetch --url $URL --readahead 9000P
expect_error "--page-size 3000" "power of two" "$UBLK" prefetch --url $URL --page-size 3000
expect_error "an unknown option is one line" "Unknown option" "$UBLK" prefetch --url $URL --no-such-option
expect_error "a header with CR LF" "line break" "$UBLK" prefetch --url $URL --header $'X-A: SECRET\r\nX-B: c'
expect_error "a URL with CR LF" "line break" "$UBLK" prefetch --url $'http://127.0.0.1/x\r\nX-B: c'
check "the header error does not show the value" bash -c "! '$UBLK' prefetch --url $URL --header \$'X-A: SECRET\\r\\n' 2>&1 | grep -q SECRET"
printf 'Authorization: Bearer SECRETTOKEN\n' > $W/headers; chmod 644 $W/headers
expect_error "a header file others can read is refused" "readable by every user" "$UBLK" prefetch --url $URL --header-file $W/headers --cache $W/hc --bitmap $W/hb
chmod 600 $W/headers
check "prefetch with a --header-file (0600)" "$UBLK" prefetch --url $URL --header-file $W/headers --cache $W/hc --bitmap $W/hb --range 0-64K
truncate -s 3T $W/www/huge.img
expect_error "an image of more than 2^32 pages is refused at the probe, not allocated" "3298534883328 bytes, more than the 2199023255552" \
    "$UBLK" prefetch --url http://127.0.0.1:$PORT/huge.img --page-size 512 --cache $W/hc2 --bitmap $W/hb2
check "and no cache file was made" test ! -e $W/hc2

section "transient faults and redaction"
S=$(date +%s)
expect_error "an unresolvable name: retried, then one line, query redacted" "nonexistent.invalid.*X-Amz-Signature=REDACTED.*after 5 attempts" \
    "$UBLK" prefetch --url "http://nonexistent.invalid:8080/x?X-Amz-Signature=SECRETSIG" --cache $W/dc --bitmap $W/db
check "and within the probe's time" test $(( $(date +%s) - S )) -le 30
check "the signature is not shown" bash -c "! '$UBLK' prefetch --url 'http://nonexistent.invalid:8080/x?X-Amz-Signature=SECRETSIG' --cache $W/dc --bitmap $W/db 2>&1 | grep -q SECRETSIG"

section "S3 through moto's server mode"
if ! python3 -c 'import moto.server' 2>/dev/null; then
    python3 -m pip install -q 'moto[server]' >/dev/null 2>&1 || true
fi
if python3 -c 'import moto.server, boto3' 2>/dev/null; then
    SPORT=$(free_port)
    python3 -m moto.server -H 127.0.0.1 -p $SPORT >$W/moto.log 2>&1 &
    PIDS+=($!)
    wait_for 30 curl -sf http://127.0.0.1:$SPORT/ || true
    export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
    check "bucket and object created" python3 - <<PY
import boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:$SPORT", region_name="us-east-1")
s3.create_bucket(Bucket="images")
s3.upload_file("$W/www/img.bin", "images", "disks/img.bin")
PY
    check "prefetch s3://images/disks/img.bin" "$UBLK" prefetch --url s3://images/disks/img.bin \
        --s3-endpoint http://127.0.0.1:$SPORT --region us-east-1 --cache $W/s3c --bitmap $W/s3b
    check "the S3 object arrived intact" cmp -n $(stat -c %s $W/www/img.bin) $W/s3c $W/www/img.bin
    expect_error "s3 without credentials" "credentials" env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
        AWS_SHARED_CREDENTIALS_FILE=$W/none "$UBLK" prefetch --url s3://images/disks/img.bin --s3-endpoint http://127.0.0.1:$SPORT --cache $W/s4 --bitmap $W/s5
    printf '[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[moto]\naws_access_key_id = testing\naws_secret_access_key = testing\n' > $W/credentials
    check "s3 credentials from AWS_SHARED_CREDENTIALS_FILE, profile AWS_PROFILE" env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
        AWS_SHARED_CREDENTIALS_FILE=$W/credentials AWS_PROFILE=moto "$UBLK" prefetch --url s3://images/disks/img.bin \
        --s3-endpoint http://127.0.0.1:$SPORT --region us-east-1 --cache $W/s6c --bitmap $W/s6b
    check "that object arrived intact too" cmp -n $(stat -c %s $W/www/img.bin) $W/s6c $W/www/img.bin
    mkdir -p $W/home/.aws && cp $W/credentials $W/home/.aws/credentials
    check "s3 credentials from \$HOME/.aws/credentials" env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SHARED_CREDENTIALS_FILE \
        HOME=$W/home AWS_PROFILE=moto "$UBLK" prefetch --url s3://images/disks/img.bin \
        --s3-endpoint http://127.0.0.1:$SPORT --region us-east-1 --cache $W/s7c --bitmap $W/s7b --range 0-64K
else
    fail "moto is available" "python3 cannot import moto.server (pip install 'moto[server]')"
fi

finish
