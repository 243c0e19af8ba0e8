# shellcheck shell=bash
# bench/guest-http.sh -- the http suite of bench/guest.sh (sourced by it in
# the guest as /opt/bench/guest-http.sh when BENCH_SUITE=http; it uses
# guest.sh's helpers: snap, pct, rss, affinity, the host channel): the http
# target against nginx in the guest, with the raw curl download, the kernel
# loop device and nbdkit's curl plugin (through the kernel nbd client) as
# baselines.  Prints guest.sh's machine-readable lines:
#   @@META {json}@@      once: suite "http", settings, kernel and tool versions
#   @@START {json}@@     when a run starts
#   @@RESULT {json}@@    one per measured run (or {..., "error": "..."}),
#                        and "info" records (prefetch, memory, devices)
#   @@DONE@@             at the end
# Everything else is human-readable progress.
#
# Cases (every rep runs every case on every device in turn: interleaved):
#   cold-seq     whole-image sequential read, fio 1 MiB QD8 (size-based), MiB/s:
#                ublk-http (fresh cache files every run), nbdkit-curl, curl
#                (curl -o /dev/null of the whole object, pinned like a server)
#   cold-rand4k  fio 4k random reads QD32, time-based, no ramp, IOPS:
#                ublk-http (fresh cache every run), nbdkit-curl
#   reqcount     ublk-http, fresh cache: Range requests nginx logged for a cold
#                64 MiB sequential read (dd bs=1M iflag=direct)
#   warm-rand4k  fio 4k random reads QD32, IOPS          } ublk-http (prefetched),
#   warm-seq1m   fio 1 MiB sequential reads QD8, MiB/s   } kloop, nbdkit-cache
#   shared       a boot read set (mount a 128 MiB ext4 image, read its 80
#                files) by one device, then by BENCH_SHARED_N (4) devices
#                attached at once from one URL (add --overlay: one shared
#                base): bytes nginx served, N devices / one device
#   boot         a boot-like read set (mount a 96 MiB ext4 image, read its 32
#                small files, umount), seconds from `add` to the reads' end and
#                Range requests: ublk-http-warm (the cache a recording run
#                left), ublk-http-cold (a fresh cache), ublk-http-profile (a
#                fresh cache, `add --prefetch-profile` of the recording run's
#                profile, the reads at once, as a boot would), ublk-http-
#                profile-wait (the same, the reads after `profile status
#                --wait`); each request waits a round trip of BENCH_BOOT_RTT_MS.
#   verity       a verified image (`add --verity-root --verity-tree URL`, the
#                tree made by veritysetup in the guest) against the same image
#                unverified, each device in turn: verity-cold-seq (whole-image
#                sequential read, fio 1 MiB QD8, fresh cache, MiB/s), then on
#                the same device verity-warm-rand4k (4k random reads QD32 of
#                the pages just fetched, IOPS): ublk-http-verity vs ublk-http.
#   fleet        BENCH_FLEET_N (60) overlays of one image on one host (not in
#                the default list): add times, PSS, del -a; see case_fleet.
#   mirrors      one image from two nginx (not in the default list): one slow
#                (netem on its port), or one stopped mid-run; see case_mirrors.
#   wan          a far object store (not in the default list): https with
#                HTTP/2 and plain http behind netem, BENCH_WAN_RTTS (10 50 ms)
#                at BENCH_WAN_RATE (400mbit); see case_wan.
# The server RSS (VmRSS/VmHWM) is taken right after each cold-seq run.
#
# Pinning: this script, fio and nginx run on vCPU 0 (FIO_CPU); every "server"
# (ublk-http via `taskset -c 1 ublk-http add`, nbdkit, curl for the download
# baseline) on vCPU 1 (SRV_CPU); with BENCH_WQ_PIN=1 (default) the kernel's
# unbound workqueues (loop's and nbd's workers) are restricted to vCPU 1 too.
#
# Settings (environment, from bench/run.sh --suite http through vm/run.sh --env):
#   BENCH_REPS (3)  BENCH_RUNTIME (10 s: cold random)  BENCH_WARM_RUNTIME (10 s)
#   BENCH_RAMP (2 s: warm runs)  BENCH_IMG_MB (256)  BENCH_REQ_MB (64)  BENCH_WQ_PIN (1)
#   BENCH_CASES ("cold-seq cold-rand4k reqcount warm-rand4k warm-seq1m shared boot verity")  BENCH_SHARED_N (4)
#   BENCH_BOOT_RTT_MS (50: the boot case's round trip to nginx, netem on lo; 0: none)
#   BENCH_NBD (1: include the nbdkit devices)
#   BENCH_WAN_RTTS ("10 50")  BENCH_WAN_RATE (none): the wan case's links
#   BENCH_MIRROR_SLOW_MS (100): how much later the mirrors case's slow mirror answers

WRUNTIME=${BENCH_WARM_RUNTIME:-10}
WRAMP=$RAMP
IMG_MB=${BENCH_IMG_MB:-256}
REQ_MB=${BENCH_REQ_MB:-64}
NBD=${BENCH_NBD:-1}
read -r -a CASES <<<"${BENCH_CASES:-cold-seq cold-rand4k reqcount warm-rand4k warm-seq1m shared boot verity}"
SRV_CPU=$SERVER_CPU
WWW=/tmp/www IMG=/tmp/www/img URL=http://127.0.0.1:8080/img
CDIR=/tmp/ublk-cache COPY=/tmp/copy.img
NGINX_LOG=/var/log/nginx/access.log
NBDKIT_PLUGIN=/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-curl-plugin.so
NBD_COLD=/dev/nbd0 NBD_WARM=/dev/nbd1
IMG_BYTES=$((IMG_MB << 20))

h_die() { echo "[bench] ERROR: $*"; echo "@@RESULT $(jq -cn --arg e "$*" '{case:"setup",device:"-",rep:0,error:$e}')@@"; exit 1; }
emit() { echo "@@RESULT $1@@"; }
# start_mark CASE DEVICE REP: the host times each run from this line to its
# result; before it, the guest waits (within its budget) for a quiet host.
start_mark() { host_quiet; echo "@@START {\"case\":\"$1\",\"device\":\"$2\",\"rep\":$3}@@"; }
# err CASE DEVICE REP MESSAGE: an error record
err() {
    log "rep $3 $1 $2: FAILED: $4"
    emit "$(jq -cn --arg c "$1" --arg d "$2" --argjson r "$3" --arg e "$4" '{case:$c,device:$d,rep:$r,error:$e}')"
}
now_us() { echo "${EPOCHREALTIME/./}"; }

# ---- CPU accounting: guest.sh's snap (A/B snapshots: _t, _c0b/_c0t, _c1b/_c1t,
# _su/_ss utime/stime ticks of the server) and pct.
# cpu_json: the CPU use between snapshots A and B as a JSON object.
cpu_json() {
    local -i wall=$(((B_t - A_t) / 10000))   # USER_HZ = 100 ticks per second
    jq -cn --argjson c0 "$(pct $((B_c0b - A_c0b)) $((B_c0t - A_c0t)))" \
        --argjson c1 "$(pct $((B_c1b - A_c1b)) $((B_c1t - A_c1t)))" \
        --argjson su "$(pct $((B_su - A_su)) $wall)" --argjson ss "$(pct $((B_ss - A_ss)) $wall)" \
        --argjson wall "$(awk -v t=$((B_t - A_t)) 'BEGIN { printf "%.3f", t / 1e6 }')" \
        '{cpu0_busy_pct: $c0, cpu1_busy_pct: $c1, server_user_pct: $su, server_sys_pct: $ss, wall_s: $wall}'
}

# ---- fio ------------------------------------------------------------------------------------------
FIO_COMMON=(--ioengine=io_uring --direct=1 --numjobs=1 --randrepeat=0 --norandommap --lat_percentiles=1
            --percentile_list=50:99 --eta=never --disk_util=0 --output-format=json)
# fio_dev OUT DEV PID ARGS...: pinned fio on DEV with CPU snapshots A/B around it.
fio_dev() {
    local out=$1 dev=$2 pid=$3; shift 3
    snap A "$pid"
    taskset -c "$FIO_CPU" timeout 180 fio --name=b --filename="$dev" "${FIO_COMMON[@]}" --output="$out" "$@" \
        >/tmp/fio.stderr 2>&1
    local rc=$?
    snap B "$pid"
    return $rc
}
# fio_json OUT: the read side of fio's JSON as a compact object.
fio_json() {
    jq -c '.jobs[0] as $j | $j.read as $s |
        {iops: $s.iops, mib_s: ($s.bw_bytes / 1048576), lat_mean_us: ($s.lat_ns.mean / 1000),
         lat_p50_us: (($s.lat_ns.percentile["50.000000"] // 0) / 1000),
         lat_p99_us: (($s.lat_ns.percentile["99.000000"] // 0) / 1000), lat_max_us: ($s.lat_ns.max / 1000),
         ios: $s.total_ios, bytes: $s.io_bytes, runtime_s: ($s.runtime / 1000), fio_errors: $j.error}' "$1"
}
# record CASE DEVICE REP METRIC FIOOUT EXTRA_JSON: a result line from a fio run.
record() {
    local c=$1 d=$2 rep=$3 metric=$4 out=$5 extra=${6:-"{}"} f
    f=$(fio_json "$out" 2>/dev/null) || { err "$c" "$d" "$rep" "fio output unreadable: $(tail -n 2 /tmp/fio.stderr | tr '\n' ' ')"; return 1; }
    local res
    res=$(jq -cn --arg c "$c" --arg d "$d" --argjson r "$rep" --arg m "$metric" --argjson f "$f" \
        --argjson cpu "$(cpu_json)" --argjson x "$extra" \
        '{case: $c, device: $d, rep: $r, metric: $m, value: (if $m == "IOPS" then $f.iops else $f.mib_s end)} + $f + {cpu: $cpu} + $x')
    emit "$res"
    jq -r '"[bench] rep \(.rep) \(.case) \(.device): \(.value * 10 | floor / 10) \(.metric) (\(.iops | floor) IOPS, \(.mib_s * 10 | floor / 10) MiB/s, mean \(.lat_mean_us | floor) us, p99 \(.lat_p99_us | floor) us); cpu0 \(.cpu.cpu0_busy_pct)% cpu1 \(.cpu.cpu1_busy_pct)%, server usr \(.cpu.server_user_pct // "-")% sys \(.cpu.server_sys_pct // "-")%"' <<<"$res"
}

# ---- ublk-http -------------------------------------------------------------------------------------
# http_add CACHEBASE ARGS...: `ublk-http add -t http` (of HTTP_URL, else URL) on the server vCPU; sets
# U_ID, U_DEV, U_PID, U_JSON (or U_ERR and returns 1).
http_add() {
    local base=$1; shift
    U_JSON=$(taskset -c "$SRV_CPU" timeout 60 "$UBLK" add -t http --url "${HTTP_URL:-$URL}" --cache "$base.cache" \
        --bitmap "$base.bitmap" "$@" 2>&1) || { U_ERR=$(echo "$U_JSON" | tail -n 3 | tr '\n' ' '); return 1; }
    U_ID=$(jq -r .dev_id <<<"$U_JSON") U_DEV=$(jq -r .block_device <<<"$U_JSON") U_PID=$(jq -r .pid <<<"$U_JSON")
}
ublk_del() { timeout 60 "$UBLK" del -n "$1" >/dev/null 2>&1 || log "del -n $1 failed"; }
# ublk_stats ID: the server's statistics (published once a second) as JSON.
ublk_stats() { sleep 1.2; timeout 10 "$UBLK" stats -n "$1" --json 2>/dev/null || echo '{}'; }
# rss_json PID: memory of the server from /proc/PID/status, in KiB, plus
# CacheMapRss: the resident part of its mapping of the cache file (under
# $CDIR; user-copy mode maps the cache file when it is on tmpfs). Those pages
# are the cache itself, in memory whether mapped or not, and count in VmRSS
# (as RssShmem) only because they are mapped: VmRSS - CacheMapRss is what
# the server itself holds.
rss_json() {
    [[ -r /proc/$1/status ]] || { echo '{}'; return; }
    local map
    map=$(awk -v dir="$CDIR/" '/^[0-9a-f]+-[0-9a-f]+ / { inmap = index($0, dir) > 0; next }
                              inmap && /^Rss:/ { n += $2 } END { print n + 0 }' "/proc/$1/smaps" 2>/dev/null)
    awk -v map="${map:-0}" '/^(VmRSS|VmHWM|RssAnon|RssFile|RssShmem|VmSize|Threads):/ { sub(":", "", $1); printf "%s\"%s\":%d", (n++ ? "," : "{"), $1, $2 }
         END { printf "%s\"CacheMapRss\":%d}\n", (n ? "," : "{"), map }' "/proc/$1/status"
}
threads_cpus() { affinity "$@"; }   # PID: the CPUs the threads of PID may run on
# qinfo DEV: the block queue limits that shape large reads.
qinfo() {
    local q=/sys/block/$(basename "$(realpath "$1")")/queue
    echo "max_sectors_kb=$(cat $q/max_sectors_kb 2>/dev/null) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb 2>/dev/null) nr_requests=$(cat $q/nr_requests 2>/dev/null) lbs=$(cat $q/logical_block_size 2>/dev/null)"
}
ranges() { grep -c 'GET /img HTTP/1.1" 206' "$NGINX_LOG" || true; }

# ---- nbdkit + nbd-client -----------------------------------------------------------------------
NBD_MODE=unix
# nbd_up NAME DEV NBDKIT-ARGS...: nbdkit on the server vCPU behind a unix
# socket (TCP 127.0.0.1:10809+ if nbd-client refuses -unix), attached to DEV.
# Sets N_PID.
nbd_up() {
    local name=$1 dev=$2 sock=/tmp/nbd-$1.sock pidf=/tmp/nbdkit-$1.pid port i
    shift 2
    rm -f "$sock" "$pidf"
    port=$((10809 + ${dev#/dev/nbd}))
    if [[ $NBD_MODE == unix ]]; then
        TMPDIR=/tmp taskset -c "$SRV_CPU" nbdkit -U "$sock" -P "$pidf" "$@" >/tmp/nbdkit-$name.log 2>&1 \
            || { log "nbdkit failed: $(cat /tmp/nbdkit-$name.log)"; return 1; }
    else
        TMPDIR=/tmp taskset -c "$SRV_CPU" nbdkit -i 127.0.0.1 -p "$port" -P "$pidf" "$@" >/tmp/nbdkit-$name.log 2>&1 \
            || { log "nbdkit failed: $(cat /tmp/nbdkit-$name.log)"; return 1; }
    fi
    for i in $(seq 50); do [[ -s $pidf ]] && break; sleep 0.1; done
    N_PID=$(cat "$pidf" 2>/dev/null)
    [[ -n $N_PID ]] || { log "nbdkit wrote no pid file"; return 1; }
    if [[ $NBD_MODE == unix ]]; then
        if ! timeout 30 nbd-client -unix "$sock" "$dev" >/tmp/nbd-client.log 2>&1; then
            log "nbd-client -unix failed ($(tr '\n' ' ' </tmp/nbd-client.log)); switching to TCP"
            nbd_kill; NBD_MODE=tcp; nbd_up "$name" "$dev" "$@"; return
        fi
    else
        timeout 30 nbd-client 127.0.0.1 "$port" "$dev" >/tmp/nbd-client.log 2>&1 \
            || { log "nbd-client failed: $(tr '\n' ' ' </tmp/nbd-client.log)"; nbd_kill; return 1; }
    fi
    for i in $(seq 100); do
        [[ "$(blockdev --getsize64 "$dev" 2>/dev/null)" == "$IMG_BYTES" ]] && return 0
        sleep 0.1
    done
    log "$dev has size $(blockdev --getsize64 "$dev" 2>/dev/null), not $IMG_BYTES"; return 1
}
nbd_kill() {
    [[ -n ${N_PID:-} ]] || return 0
    kill "$N_PID" 2>/dev/null
    local i; for i in $(seq 50); do kill -0 "$N_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$N_PID" 2>/dev/null; N_PID=""
}
nbd_down() { # DEV PID
    timeout 30 nbd-client -d "$1" >/dev/null 2>&1 || log "nbd-client -d $1 failed"
    N_PID=$2 nbd_kill
}

# ---- cases -------------------------------------------------------------------------------------------
SEQ_ARGS=(--rw=read --bs=1M --iodepth=8 --size="$IMG_BYTES" --runtime=150)
RAND_ARGS=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME" --ramp_time=0)
WRAND_ARGS=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime="$WRUNTIME" --ramp_time="$WRAMP")
WSEQ_ARGS=(--rw=read --bs=1M --iodepth=8 --time_based --runtime="$WRUNTIME" --ramp_time="$WRAMP")

# cold_ublk CASE REP FIOARGS...: fresh cache files, add, fio, stats (+ RSS), del.
cold_ublk() {
    local c=$1 rep=$2; shift 2
    start_mark "$c" ublk-http "$rep"
    rm -f "$CDIR"/cold.*
    http_add "$CDIR/cold" || { err "$c" ublk-http "$rep" "add: $U_ERR"; return; }
    local out=/tmp/fio-$c-ublk-$rep.json rss stats
    if ! fio_dev "$out" "$U_DEV" "$U_PID" "$@"; then
        err "$c" ublk-http "$rep" "fio: $(tail -n 3 /tmp/fio.stderr | tr '\n' ' ')"
        ublk_del "$U_ID"; return
    fi
    rss=$(rss_json "$U_PID")
    stats=$(ublk_stats "$U_ID")
    record "$c" ublk-http "$rep" "$([[ $c == cold-seq ]] && echo MiB/s || echo IOPS)" "$out" \
        "$(jq -cn --argjson rss "$rss" --argjson st "$stats" --arg cpus "$(threads_cpus "$U_PID")" \
            '{rss_kb: $rss, stats: $st, server_threads_cpus: $cpus}')"
    [[ $c == cold-seq ]] && log "  server RSS: $(jq -r '"VmRSS \(.VmRSS) KiB, VmHWM \(.VmHWM) KiB (anon \(.RssAnon), file \(.RssFile), shmem \(.RssShmem)), of which the mapped cache file \(.CacheMapRss)"' <<<"$rss"); stats: $stats"
    ublk_del "$U_ID"
    rm -f "$CDIR"/cold.*
}
# cold_nbd CASE REP FIOARGS...: a fresh nbdkit curl plugin (no cache) each run.
cold_nbd() {
    local c=$1 rep=$2; shift 2
    start_mark "$c" nbdkit-curl "$rep"
    nbd_up cold "$NBD_COLD" curl "url=$URL" || { err "$c" nbdkit-curl "$rep" "nbdkit/nbd-client setup failed"; nbd_down "$NBD_COLD" "${N_PID:-}"; return; }
    local pid=$N_PID out=/tmp/fio-$c-nbd-$rep.json
    if fio_dev "$out" "$NBD_COLD" "$pid" "$@"; then
        record "$c" nbdkit-curl "$rep" "$([[ $c == cold-seq ]] && echo MiB/s || echo IOPS)" "$out" \
            "$(jq -cn --arg mode "$NBD_MODE" '{nbd_transport: $mode}')"
    else
        err "$c" nbdkit-curl "$rep" "fio: $(tail -n 3 /tmp/fio.stderr | tr '\n' ' ')"
    fi
    nbd_down "$NBD_COLD" "$pid"
}
# curl_download REP [DEVICE OUTPUT]: the whole object with curl, pinned like a
# server: to /dev/null ("curl", the limit of the transfer alone), or to a file
# on the cache's filesystem ("curl-file": download first, what the http target
# replaces; the transfer plus storing it).
curl_download() {
    local rep=$1 dev=${2:-curl} dst=${3:-/dev/null} o
    start_mark cold-seq "$dev" "$rep"
    snap A ""
    o=$(taskset -c "$SRV_CPU" timeout 120 curl -s -S -o "$dst" -w '%{size_download} %{time_total} %{http_code}' "$URL" 2>&1)
    local rc=$?
    snap B ""
    [[ $dst == /dev/null ]] || rm -f "$dst"
    local size t code
    read -r size t code <<<"$o"
    if [[ $rc -ne 0 || $code != 200 || $size != "$IMG_BYTES" ]]; then err cold-seq "$dev" "$rep" "curl: rc $rc: $o"; return; fi
    local res
    res=$(jq -cn --argjson r "$rep" --arg d "$dev" --argjson size "$size" --argjson t "$t" --argjson cpu "$(cpu_json)" \
        '{case: "cold-seq", device: $d, rep: $r, metric: "MiB/s", value: ($size / 1048576 / $t), mib_s: ($size / 1048576 / $t),
          bytes: $size, runtime_s: $t, cpu: $cpu}')
    emit "$res"
    jq -r '"[bench] rep \(.rep) cold-seq \(.device): \(.value * 10 | floor / 10) MiB/s (\(.runtime_s) s); cpu0 \(.cpu.cpu0_busy_pct)% cpu1 \(.cpu.cpu1_busy_pct)%"' <<<"$res"
}
# store_only REP: writing the image's size into a file on the cache's
# filesystem with no network at all (dd from /dev/zero, 1 MiB writes), pinned
# like a server: what storing the bytes alone costs in this VM ("store").
store_only() {
    local rep=$1 f=$CDIR/store.tmp
    start_mark cold-seq store "$rep"
    snap A ""
    local t0=$EPOCHREALTIME
    if ! taskset -c "$SRV_CPU" dd if=/dev/zero of="$f" bs=1M count="$IMG_MB" status=none; then
        rm -f "$f"; err cold-seq store "$rep" "dd failed"; return
    fi
    local t1=$EPOCHREALTIME
    snap B ""
    rm -f "$f"
    local res
    res=$(jq -cn --argjson r "$rep" --argjson size "$IMG_BYTES" --argjson us "$(( ${t1/./} - ${t0/./} ))" --argjson cpu "$(cpu_json)" \
        '($us / 1e6) as $t | {case: "cold-seq", device: "store", rep: $r, metric: "MiB/s", value: ($size / 1048576 / $t),
          mib_s: ($size / 1048576 / $t), bytes: $size, runtime_s: $t, cpu: $cpu}')
    emit "$res"
    jq -r '"[bench] rep \(.rep) cold-seq store: \(.value * 10 | floor / 10) MiB/s (\(.runtime_s) s)"' <<<"$res"
}

case_cold_seq() {
    local rep=$1
    cold_ublk cold-seq "$rep" "${SEQ_ARGS[@]}"
    [[ $NBD == 1 ]] && cold_nbd cold-seq "$rep" "${SEQ_ARGS[@]}"
    curl_download "$rep"
    curl_download "$rep" curl-file "$CDIR/download.img"
    store_only "$rep"
}
# ---- verity: the same image, verified and not ----
VERITY_ROOT=""
verity_tree() {
    [[ -n $VERITY_ROOT ]] && return 0
    VERITY_ROOT=$(veritysetup format "$IMG" "$WWW/img.tree" 2>/dev/null | sed -n 's/^Root hash:[[:space:]]*//p')
    [[ -n $VERITY_ROOT ]] && log "verity tree: $(stat -c %s "$WWW/img.tree") bytes, root $VERITY_ROOT"
}
case_verity() {
    local rep=$1 dev out st
    verity_tree || { err verity-cold-seq ublk-http-verity "$rep" "veritysetup format failed"; return; }
    for dev in ublk-http ublk-http-verity; do
        local args=()
        [[ $dev == ublk-http-verity ]] && args=(--verity-root "$VERITY_ROOT" --verity-tree "http://127.0.0.1:8080/img.tree")
        rm -f "$CDIR"/ver.*
        start_mark verity-cold-seq "$dev" "$rep"
        http_add "$CDIR/ver" "${args[@]}" || { err verity-cold-seq "$dev" "$rep" "add: $U_ERR"; continue; }
        out=/tmp/fio-vcs-$dev-$rep.json
        if fio_dev "$out" "$U_DEV" "$U_PID" "${SEQ_ARGS[@]}"; then
            st=$(ublk_stats "$U_ID")
            record verity-cold-seq "$dev" "$rep" MiB/s "$out" \
                "$(jq -cn --argjson st "$st" --argjson rss "$(rss_json "$U_PID")" '{stats: $st, rss_kb: $rss}')"
            start_mark verity-warm-rand4k "$dev" "$rep"
            out=/tmp/fio-vwr-$dev-$rep.json
            if fio_dev "$out" "$U_DEV" "$U_PID" "${WRAND_ARGS[@]}"; then
                record verity-warm-rand4k "$dev" "$rep" IOPS "$out" "$(jq -cn --argjson st "$(ublk_stats "$U_ID")" '{stats: $st}')"
            else
                err verity-warm-rand4k "$dev" "$rep" "fio: $(tail -n 3 /tmp/fio.stderr | tr '\n' ' ')"
            fi
        else
            err verity-cold-seq "$dev" "$rep" "fio: $(tail -n 3 /tmp/fio.stderr | tr '\n' ' ')"
        fi
        ublk_del "$U_ID"
    done
    rm -f "$CDIR"/ver.*
}
case_cold_rand4k() {
    local rep=$1
    cold_ublk cold-rand4k "$rep" "${RAND_ARGS[@]}"
    [[ $NBD == 1 ]] && cold_nbd cold-rand4k "$rep" "${RAND_ARGS[@]}"
}
case_reqcount() {
    local rep=$1 b n stats
    start_mark reqcount ublk-http "$rep"
    rm -f "$CDIR"/req.*
    http_add "$CDIR/req" || { err reqcount ublk-http "$rep" "add: $U_ERR"; return; }
    sleep 1                                  # after the kernel's partition scan
    b=$(ranges)
    if ! taskset -c "$FIO_CPU" dd if="$U_DEV" of=/dev/null bs=1M count="$REQ_MB" iflag=direct status=none; then
        err reqcount ublk-http "$rep" "dd failed"; ublk_del "$U_ID"; return
    fi
    local n0=$(( $(ranges) - b ))             # right after dd, as tests/vm/http.sh counts
    stats=$(ublk_stats "$U_ID")               # 1.2 s later: readahead still in flight has landed
    n=$(( $(ranges) - b ))
    local goal=$(( REQ_MB / 4 + 4 ))
    emit "$(jq -cn --argjson r "$rep" --argjson n "$n" --argjson n0 "$n0" --argjson goal "$goal" --argjson mb "$REQ_MB" --argjson st "$stats" \
        '{case: "reqcount", device: "ublk-http", rep: $r, metric: "requests", value: $n, requests_at_dd_end: $n0,
          read_mib: $mb, goal_max: $goal, stats: $st}')"
    log "rep $rep reqcount ublk-http: $n Range requests for a cold $REQ_MB MiB sequential read ($n0 when dd ended; goal <= $goal); fetched $(jq -r '.bytes_fetched // "?"' <<<"$stats") bytes"
    ublk_del "$U_ID"
    rm -f "$CDIR"/req.*
}

# ---- one image, many devices ------------------------------------------------------------------
SHARED_IMG=$WWW/shared.img SHARED_URL=http://127.0.0.1:8080/shared.img SHARED_SRC=/tmp/shared-src
SHARED_N=${BENCH_SHARED_N:-4}
SHARED_UP=0
# shared_image: an ext4 image holding a set of files of mixed sizes (a boot's
# read set: mount it, read every file), made once per boot of the VM.
shared_image() {
    [[ $SHARED_UP == 1 ]] && return 0
    SHARED_UP=1
    rm -rf "$SHARED_SRC"; mkdir -p "$SHARED_SRC/lib" "$SHARED_SRC/etc"
    local i
    for i in $(seq 1 48); do head -c $(( (i * 7919 % 61 + 4) * 8192 + i )) /dev/urandom > "$SHARED_SRC/lib/f$i"; done
    for i in $(seq 1 32); do seq 1 $((i * 50)) > "$SHARED_SRC/etc/c$i"; done
    truncate -s 128M "$SHARED_IMG"
    mkfs.ext4 -q -F -d "$SHARED_SRC" "$SHARED_IMG" || h_die "mkfs.ext4 of the boot image failed"
    log "shared image: 128 MiB ext4, $(du -sk "$SHARED_SRC" | cut -f1) KiB in $(find "$SHARED_SRC" -type f | wc -l) files"
}
# shared_read DEV MNT: mount read-only, read every file, umount; prints the microseconds it took.
shared_read() {
    local t0
    mkdir -p "$2"
    t0=$(now_us)
    mount -t ext4 -o ro,noload "$1" "$2" || return 1
    cat "$2"/lib/* "$2"/etc/* > /dev/null || { umount "$2"; return 1; }
    umount "$2" || return 1
    echo $(( $(now_us) - t0 ))
}
# The body bytes and Range requests nginx logged for FILE so far.
served_bytes() { awk -v f="/$1" '$5 == f { s += $8 } END { print s + 0 }' "$NGINX_LOG"; }
served_reqs() { awk -v f="/$1" '$5 == f && $7 == 206 { n++ } END { print n + 0 }' "$NGINX_LOG"; }

# shared: one device alone reads the boot set from a fresh base; then
# SHARED_N devices attached at once from the same URL (add --overlay: one
# shared base) read it together. Bytes nginx served, N devices / one device.
case_shared() {
    local rep=$1 b0 b1 bn t1 id base i ids=() tmax=0
    shared_image
    start_mark shared ublk-http "$rep"
    rm -rf "$CDIR"/sh.* "$CDIR/ov"; mkdir -p "$CDIR/ov"
    local opts=(--url "$SHARED_URL" --cache "$CDIR/sh.cache" --bitmap "$CDIR/sh.bitmap" --overlay-dir "$CDIR/ov")
    b0=$(served_bytes shared.img)
    U_JSON=$(taskset -c "$SRV_CPU" timeout 60 "$UBLK" add -t http "${opts[@]}" --overlay one 2>&1) \
        || { err shared ublk-http "$rep" "add: $(tail -n 2 <<<"$U_JSON" | tr '\n' ' ')"; return; }
    id=$(jq -r .dev_id <<<"$U_JSON")
    base=$(jq -r .target_options.lower <<<"$U_JSON"); base=${base#/dev/ublkb}
    t1=$(shared_read "/dev/ublkb$id" /mnt/sh0) || { err shared ublk-http "$rep" "boot read of one device failed"; ublk_del "$id"; ublk_del "$base"; return; }
    b1=$(( $(served_bytes shared.img) - b0 ))
    ublk_del "$id"; ublk_del "$base"
    rm -rf "$CDIR"/sh.* "$CDIR/ov"; mkdir -p "$CDIR/ov"
    b0=$(served_bytes shared.img)
    for i in $(seq 1 "$SHARED_N"); do
        U_JSON=$(taskset -c "$SRV_CPU" timeout 60 "$UBLK" add -t http "${opts[@]}" --overlay "d$i" 2>&1) \
            || { err shared ublk-http "$rep" "add $i: $(tail -n 2 <<<"$U_JSON" | tr '\n' ' ')"; break; }
        ids+=("$(jq -r .dev_id <<<"$U_JSON")")
    done
    base=$(jq -r .target_options.lower <<<"$U_JSON"); base=${base#/dev/ublkb}
    if [[ ${#ids[@]} == "$SHARED_N" ]]; then
        for i in "${!ids[@]}"; do shared_read "/dev/ublkb${ids[$i]}" "/mnt/sh$((i + 1))" > "/tmp/shared-$i.us" & done
        wait
        for i in "${!ids[@]}"; do
            local t; t=$(cat "/tmp/shared-$i.us")
            [[ -n $t ]] || { err shared ublk-http "$rep" "boot read of device $((i + 1)) failed"; tmax=-1; break; }
            (( t > tmax )) && tmax=$t
        done
        bn=$(( $(served_bytes shared.img) - b0 ))
        if (( tmax > 0 && b1 > 0 )); then
            emit "$(jq -cn --argjson r "$rep" --argjson n "$SHARED_N" --argjson b1 "$b1" --argjson bn "$bn" --argjson t1 "$t1" --argjson tn "$tmax" \
                '{case: "shared", device: "ublk-http", rep: $r, metric: "bytes vs one device", value: ($bn / $b1), devices: $n,
                  bytes_one: $b1, bytes_n: $bn, time_one_s: ($t1 / 1e6), time_n_max_s: ($tn / 1e6)}')"
            log "rep $rep shared: $SHARED_N devices fetched $bn bytes, one alone $b1 ($(jq -n "$bn / $b1 * 100 | floor / 100")x); boot read $((t1 / 1000)) ms alone, $((tmax / 1000)) ms the slowest of $SHARED_N"
        fi
    fi
    for i in "${ids[@]}"; do ublk_del "$i"; done
    [[ -n $base && $base != null ]] && ublk_del "$base"
    rm -rf "$CDIR"/sh.* "$CDIR/ov"
}

# ---- fleet: a host full of overlays --------------------------------------------------------------
#   fleet   BENCH_FLEET_N (60) overlay devices of one image (add --overlay: one
#           shared base), added one after another (each add's time), then each
#           mounted, two of the image's files compared and a file of its own
#           written and read back; the servers' summed PSS (smaps_rollup: pages
#           shared between the servers count once in the sum) and `del -a`'s time.
#           The driver allows 64 devices unless ublk_drv's ublks_max says more.
FLEET_N=${BENCH_FLEET_N:-60}
pss_kb() { awk '/^Pss:/ { print $2; exit }' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
case_fleet() {
    local rep=$1 i t0 t1 adds=() ids=() ok=0 pss=0 base_pss=0 base="" pid id dt
    shared_image
    start_mark fleet ublk-http "$rep"
    rm -rf "$CDIR"/fl.* "$CDIR/flov"; mkdir -p "$CDIR/flov" /mnt/fl
    local opts=(--url "$SHARED_URL" --cache "$CDIR/fl.cache" --bitmap "$CDIR/fl.bitmap" --overlay-dir "$CDIR/flov")
    for i in $(seq 1 "$FLEET_N"); do
        t0=$(now_us)
        U_JSON=$(taskset -c "$SRV_CPU" timeout 60 "$UBLK" add -t http "${opts[@]}" --overlay "f$i" 2>&1) \
            || { err fleet ublk-http "$rep" "add $i: $(tail -n 2 <<<"$U_JSON" | tr '\n' ' ')"; break; }
        t1=$(now_us)
        adds+=($(( (t1 - t0) / 1000 )))
        ids+=("$(jq -r .dev_id <<<"$U_JSON")")
        base=$(jq -r .target_options.lower <<<"$U_JSON"); base=${base#/dev/ublkb}
    done
    for id in "${ids[@]}"; do
        if mount -t ext4 "/dev/ublkb$id" /mnt/fl 2>/dev/null; then
            cmp -s "$SHARED_SRC/lib/f7" /mnt/fl/lib/f7 && cmp -s "$SHARED_SRC/etc/c9" /mnt/fl/etc/c9 \
                && echo "device $id" > /mnt/fl/own && sync -f /mnt/fl/own && [[ "$(cat /mnt/fl/own)" == "device $id" ]] && ok=$((ok + 1))
            umount /mnt/fl
        fi
    done
    for id in "${ids[@]}"; do
        pid=$(timeout 10 "$UBLK" list -n "$id" | jq -r '.[0].pid')
        pss=$((pss + $(pss_kb "$pid")))
    done
    [[ -n $base && $base != null ]] && base_pss=$(pss_kb "$(timeout 10 "$UBLK" list -n "$base" | jq -r '.[0].pid')")
    t0=$(now_us)
    timeout 120 "$UBLK" del -a >/dev/null 2>&1 || log "fleet: del -a failed"
    t1=$(now_us)
    dt=$(( (t1 - t0) / 1000 ))
    rm -rf "$CDIR"/fl.* "$CDIR/flov"
    [[ ${#ids[@]} -gt 0 ]] || return
    emit "$(jq -cn --argjson r "$rep" --argjson n "${#ids[@]}" --argjson want "$FLEET_N" --argjson ok "$ok" \
        --argjson adds "[$(IFS=,; echo "${adds[*]}")]" --argjson pss "$pss" --argjson bpss "$base_pss" --argjson del "$dt" \
        '($adds | sort) as $s | {case: "fleet", device: "ublk-http", rep: $r, metric: "KiB PSS per overlay server", value: ($pss / $n),
          devices: $n, wanted: $want, verified: $ok, pss_overlays_kb: $pss, pss_base_kb: $bpss,
          add_ms_median: $s[($n / 2 | floor)], add_ms_max: $s[-1], add_ms: $adds, del_all_ms: $del}')"
    log "rep $rep fleet: ${#ids[@]}/$FLEET_N added, $ok verified; add median $(tr ' ' '\n' <<<"${adds[*]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') ms; PSS $((pss / 1024)) MiB over ${#ids[@]} overlay servers (+ base $((base_pss / 1024)) MiB); del -a ${dt} ms"
}

# ---- boot: a boot-like read set with and without a profile ------------------------------------------
BOOT_UP=0
BOOT_URL=http://127.0.0.1:8080/boot.img BOOT_PROFILE=/tmp/boot.profile
boot_ranges() { grep -c 'GET /boot.img HTTP/1.1" 206' "$NGINX_LOG" || true; }
boot_reads() { mount -t ext4 -o ro "$1" /mnt/boot && (cd /mnt/boot && cat etc/* lib/* >/dev/null) && umount /mnt/boot; }
# boot_setup: the image (once), and a profile recorded while the reads run on a fresh cache.
boot_setup() {
    [[ $BOOT_UP == 1 ]] && return 0
    local src i
    src=$(mktemp -d)
    mkdir -p "$src/etc" "$src/lib" "$src/bin" /mnt/boot
    for i in $(seq 1 24); do head -c $(( (i * 7919) % 60000 + 3000 )) /dev/urandom > "$src/etc/conf$i"; done
    for i in $(seq 1 8); do head -c $(( i * 90000 + 1234 )) /dev/urandom > "$src/lib/lib$i.so"; done
    head -c $((40 << 20)) /dev/urandom > "$src/bin/filler"
    truncate -s 96M "$WWW/boot.img"
    mkfs.ext4 -q -F -d "$src" "$WWW/boot.img" || { rm -rf "$src"; return 1; }
    rm -rf "$src" "$CDIR"/bootwarm.*
    U_JSON=$(taskset -c "$SRV_CPU" timeout 60 "$UBLK" add -t http --url "$BOOT_URL" --cache "$CDIR/bootwarm.cache" \
        --bitmap "$CDIR/bootwarm.bitmap" 2>&1) || return 1
    U_ID=$(jq -r .dev_id <<<"$U_JSON") U_DEV=$(jq -r .block_device <<<"$U_JSON")
    sleep 1
    timeout 60 "$UBLK" profile record -n "$U_ID" --out "$BOOT_PROFILE" >/tmp/bootrec.out 2>/tmp/bootrec.err &
    local rec=$! t=0
    until grep -q recording /tmp/bootrec.err || [[ $t -ge 300 ]]; do sleep 0.1; t=$((t + 1)); done
    taskset -c "$FIO_CPU" bash -c "$(declare -f boot_reads); boot_reads $U_DEV" || { ublk_del "$U_ID"; return 1; }
    timeout 10 "$UBLK" profile stop -n "$U_ID" >/dev/null
    wait "$rec" || { ublk_del "$U_ID"; return 1; }
    ublk_del "$U_ID"
    emit "$(jq -c '{case: "info", device: "ublk-http", what: "boot_profile", rep: 0, pages: .pages, runs: (.runs | length)}' "$BOOT_PROFILE")"
    log "boot profile: $(cat /tmp/bootrec.out)"
    BOOT_UP=1
}
# boot_run MODE REP: warm | cold | profile | profile-wait (the case header).
boot_run() {
    local mode=$1 rep=$2 base=$CDIR/boot args=() b t0 t1 stats
    start_mark boot "ublk-http-$mode" "$rep"
    rm -f "$CDIR"/boot.cache "$CDIR"/boot.bitmap*
    [[ $mode == warm ]] && base=$CDIR/bootwarm
    [[ $mode == profile* ]] && args=(--prefetch-profile "$BOOT_PROFILE")
    b=$(boot_ranges)
    t0=$(now_us)
    U_JSON=$(taskset -c "$SRV_CPU" timeout 60 "$UBLK" add -t http --url "$BOOT_URL" --cache "$base.cache" \
        --bitmap "$base.bitmap" "${args[@]}" 2>&1) || { err boot "ublk-http-$mode" "$rep" "add: $(tail -n 1 <<<"$U_JSON")"; return; }
    U_ID=$(jq -r .dev_id <<<"$U_JSON") U_DEV=$(jq -r .block_device <<<"$U_JSON")
    if [[ $mode == profile-wait ]] && ! timeout 120 "$UBLK" profile status -n "$U_ID" --wait >/dev/null 2>/tmp/boot.err; then
        err boot "ublk-http-$mode" "$rep" "replay: $(cat /tmp/boot.err)"; ublk_del "$U_ID"; return
    fi
    if ! taskset -c "$FIO_CPU" bash -c "$(declare -f boot_reads); boot_reads $U_DEV"; then
        err boot "ublk-http-$mode" "$rep" "mount or reads failed"; ublk_del "$U_ID"; return
    fi
    t1=$(now_us)
    stats=$(ublk_stats "$U_ID")
    emit "$(jq -cn --arg d "ublk-http-$mode" --argjson r "$rep" --argjson us $((t1 - t0)) --argjson n $(( $(boot_ranges) - b )) --argjson st "$stats" \
        --argjson rtt "$BOOT_RTT_MS" '{case: "boot", device: $d, rep: $r, metric: "seconds", value: ($us / 1e6), requests: $n, rtt_ms: $rtt, hits: ($st.hits // null),
          misses: ($st.misses // null), bytes_fetched: ($st.bytes_fetched // null)}')"
    log "rep $rep boot ublk-http-$mode: $(awk -v u=$((t1 - t0)) 'BEGIN { printf "%.2f", u / 1e6 }') s from add to the reads' end, $(( $(boot_ranges) - b )) Range requests; stats $(jq -c '{hits, misses, bytes_fetched}' <<<"$stats")"
    ublk_del "$U_ID"
}
# The remote's latency: netem on the loopback delays each packet by half of
# BENCH_BOOT_RTT_MS, so a request waits a round trip as it would for an
# object store (nginx is on the guest's loopback, with no latency of its
# own). It is on for the boot runs only, not for the recording.
BOOT_RTT_MS=${BENCH_BOOT_RTT_MS:-50}
boot_latency() { # on | off
    [[ $BOOT_RTT_MS -gt 0 ]] || return 0
    if [[ $1 == on ]]; then
        [[ -e /sys/module/sch_netem ]] || kmod-load sch_netem || return 1
        tc qdisc replace dev lo root netem delay "$(awk -v r="$BOOT_RTT_MS" 'BEGIN { printf "%.1f", r / 2 }')ms"
    else
        tc qdisc del dev lo root 2>/dev/null || true
    fi
}
case_boot() {
    local rep=$1
    boot_setup || { err boot ublk-http "$rep" "setup (mkfs, recording the profile) failed"; return; }
    if ! boot_latency on; then err boot ublk-http "$rep" "tc netem on lo failed (BENCH_BOOT_RTT_MS=$BOOT_RTT_MS)"; return; fi
    [[ $rep == 1 ]] && log "boot: a round trip of ${BOOT_RTT_MS} ms to nginx (netem on lo): $(ping -c 3 -q 127.0.0.1 2>/dev/null | tail -n 1)"
    boot_run warm "$rep"
    boot_run cold "$rep"
    boot_run profile "$rep"
    boot_run profile-wait "$rep"
    boot_latency off
}

# ---- wan: a far object store: nginx over https (h2) behind netem on lo ----
# Each RTT in BENCH_WAN_RTTS (10 50 ms): netem on the loopback delays each
# packet by half the round trip. BENCH_WAN_RATE (none) caps the rate too:
# netem's rate on the loopback's 64 KiB packets stalled bulk transfers under
# emulation (curl itself at 2-5 MiB/s, 100 s for 256 MiB, in two runs of
# three at 50 ms and 400mbit), and the emulated guest moves far less than
# 400 Mbit/s anyway (about 15 MiB/s over https).
#   wanR-rand4k  fio 4k random reads QD32, fresh cache, IOPS: ublk-http-h2
#                (https, HTTP/2 streams, --streams 32 by default) and
#                ublk-http-h1 (plain http, one request per connection,
#                --connections 8), against "bound", min(QD, 32 in flight)/RTT
#   wanR-seq     whole-image sequential read, fio 1 MiB QD8, fresh cache,
#                MiB/s: ublk-http-h2 against curl downloading the object over
#                the same https link (HTTP/2, pinned like a server)
WAN_RTTS=(${BENCH_WAN_RTTS:-10 50})
WAN_RATE=${BENCH_WAN_RATE:-}
TLS_DIR=/opt/bench/tls TLS_URL=https://127.0.0.1:8443/img
WAN_UP=0
wan_setup() {
    [[ $WAN_UP == 1 ]] && return 0
    [[ -s $TLS_DIR/cert.pem ]] || { log "no $TLS_DIR/cert.pem (bench/run.sh makes it)"; return 1; }
    [[ -e /sys/module/sch_netem ]] || kmod-load sch_netem || return 1
    mkdir -p /run/nginx /var/log/nginx
    cat > /run/nginx/tls.conf <<NGINX
user root;
worker_processes 1;
pid /run/nginx/tls.pid;
error_log /var/log/nginx/tls-error.log warn;
events { worker_connections 1024; }
http {
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    http2_max_concurrent_streams 256;
    server {
        listen 127.0.0.1:8443 ssl http2;
        ssl_certificate $TLS_DIR/cert.pem;
        ssl_certificate_key $TLS_DIR/key.pem;
        root $WWW;
    }
}
NGINX
    taskset -c "$FIO_CPU" /usr/sbin/nginx -c /run/nginx/tls.conf || return 1
    local i
    for i in $(seq 50); do
        curl -s -o /dev/null --cacert "$TLS_DIR/cert.pem" "$TLS_URL" && { WAN_UP=1; return 0; }
        sleep 0.1
    done
    return 1
}
wan_link() { # RTT_MS | off
    if [[ $1 == off ]]; then tc qdisc del dev lo root 2>/dev/null || true; return 0; fi
    tc qdisc replace dev lo root netem delay "$(awk -v r="$1" 'BEGIN { printf "%.1f", r / 2 }')ms" ${WAN_RATE:+rate "$WAN_RATE"} limit 100000
}
# wan_ublk CASE DEVICE REP FIOARGS... (after --): a fresh cache, add with
# WAN_ADD (its --url first), fio, stats, del.
wan_ublk() {
    local c=$1 d=$2 rep=$3 out st; shift 3
    start_mark "$c" "$d" "$rep"
    rm -f "$CDIR"/wan.*
    HTTP_URL=${WAN_ADD[0]} http_add "$CDIR/wan" "${WAN_ADD[@]:1}" || { err "$c" "$d" "$rep" "add: $U_ERR"; return; }
    [[ $rep == 1 ]] && log "$c $d: $(timeout 10 "$UBLK" list -n "$U_ID" | jq -r '.[0].target_options.requests_in_flight') in flight"
    out=/tmp/fio-$c-$d-$rep.json
    if fio_dev "$out" "$U_DEV" "$U_PID" "$@"; then
        st=$(ublk_stats "$U_ID")
        record "$c" "$d" "$rep" "$([[ $c == *seq ]] && echo MiB/s || echo IOPS)" "$out" "$(jq -cn --argjson st "$st" '{stats: $st}')"
    else
        err "$c" "$d" "$rep" "fio: $(tail -n 3 /tmp/fio.stderr | tr '\n' ' ')"
    fi
    ublk_del "$U_ID"
    rm -f "$CDIR"/wan.*
}
wan_curl() { # CASE REP
    local c=$1 rep=$2 o rc size t code res
    start_mark "$c" curl "$rep"
    snap A ""
    o=$(taskset -c "$SRV_CPU" timeout 300 curl -s -S --http2 --cacert "$TLS_DIR/cert.pem" -o /dev/null \
        -w '%{size_download} %{time_total} %{http_code}' "$TLS_URL" 2>&1)
    rc=$?
    snap B ""
    read -r size t code <<<"$o"
    if [[ $rc -ne 0 || $code != 200 || $size != "$IMG_BYTES" ]]; then err "$c" curl "$rep" "curl: rc $rc: $o"; return; fi
    res=$(jq -cn --arg c "$c" --argjson r "$rep" --argjson size "$size" --argjson t "$t" --argjson cpu "$(cpu_json)" \
        '{case: $c, device: "curl", rep: $r, metric: "MiB/s", value: ($size / 1048576 / $t), mib_s: ($size / 1048576 / $t),
          bytes: $size, runtime_s: $t, cpu: $cpu}')
    emit "$res"
    jq -r '"[bench] rep \(.rep) \(.case) curl: \(.value * 10 | floor / 10) MiB/s (\(.runtime_s) s)"' <<<"$res"
}
case_wan() {
    local rep=$1 rtt
    wan_setup || { err wan-setup ublk-http-h2 "$rep" "https nginx or netem did not come up"; return; }
    for rtt in "${WAN_RTTS[@]}"; do
        wan_link "$rtt" || { err "wan$rtt-rand4k" ublk-http-h2 "$rep" "tc netem failed"; continue; }
        [[ $rep == 1 ]] && log "wan: round trip ${rtt} ms${WAN_RATE:+ at $WAN_RATE} (netem on lo): $(ping -c 3 -q 127.0.0.1 2>/dev/null | tail -n 1)"
        WAN_ADD=("$TLS_URL" --cacert "$TLS_DIR/cert.pem")
        wan_ublk "wan$rtt-rand4k" ublk-http-h2 "$rep" "${RAND_ARGS[@]}"
        WAN_ADD=("$URL")
        wan_ublk "wan$rtt-rand4k" ublk-http-h1 "$rep" "${RAND_ARGS[@]}"
        emit "$(jq -cn --arg c "wan$rtt-rand4k" --argjson r "$rep" --argjson rtt "$rtt" \
            '{case: $c, device: "bound", rep: $r, metric: "IOPS", value: (32 * 1000 / $rtt), rtt_ms: $rtt, note: "min(QD 32, 32 in flight) / RTT"}')"
        WAN_ADD=("$TLS_URL" --cacert "$TLS_DIR/cert.pem")
        wan_ublk "wan$rtt-seq" ublk-http-h2 "$rep" "${SEQ_ARGS[@]}"
        wan_curl "wan$rtt-seq" "$rep"
    done
    wan_link off
}

# ---- mirrors: one image from two nginx, one slow or stopped ---------------------------------------
#   mirror-slow  cold 4k random reads QD32, fresh cache, the p99 latency (ms):
#                "fast" (--url of the fast mirror alone) and "slow-first"
#                (--url SLOW --url FAST: the slow one first, as a user who
#                lists a far mirror first would); the slow mirror answers
#                BENCH_MIRROR_SLOW_MS (100) later (netem on its port), every
#                other packet waits 5 ms (a 10 ms round trip)
#   mirror-stop  the same reads from two fast mirrors; "stopped" has the first
#                one SIGSTOPped 3 s into the run (its connections open, nothing
#                answered); "both-up" does not: the longest wait for one read
#                (ms) and fio's errors
MIRROR_SLOW_MS=${BENCH_MIRROR_SLOW_MS:-100}
MA=http://127.0.0.1:8091/img MB=http://127.0.0.1:8092/img
MIRRORS_UP=0
mirrors_setup() {
    [[ $MIRRORS_UP == 1 ]] && return 0
    local p
    for m in sch_netem sch_prio cls_u32; do [[ -e /sys/module/$m ]] || kmod-load "$m" || return 1; done
    mkdir -p /run/nginx /var/log/nginx
    for p in 8091 8092; do
        cat > /run/nginx/m$p.conf <<NGINX
user root;
master_process off;
pid /run/nginx/m$p.pid;
error_log /var/log/nginx/m$p-error.log warn;
events { worker_connections 1024; }
http {
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$p; root $WWW; }
}
NGINX
        taskset -c "$FIO_CPU" /usr/sbin/nginx -c /run/nginx/m$p.conf || return 1
    done
    MIRRORS_UP=1
}
mirrors_down() { local p; for p in 8091 8092; do kill -9 "$(cat /run/nginx/m$p.pid 2>/dev/null)" 2>/dev/null; done; }
# mirror_link on|off: every packet waits 5 ms, the slow mirror's (source port 8092) MIRROR_SLOW_MS.
mirror_link() {
    tc qdisc del dev lo root 2>/dev/null
    [[ $1 == on ]] || return 0
    tc qdisc add dev lo root handle 1: prio bands 3 priomap 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 &&
    tc qdisc add dev lo parent 1:1 handle 10: netem delay "${MIRROR_SLOW_MS}ms" limit 100000 &&
    tc qdisc add dev lo parent 1:2 handle 20: netem delay 5ms limit 100000 &&
    tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport 8092 0xffff flowid 1:1
}
# mirror_run CASE DEVICE REP VALUE STOP ADD-ARGS...: fresh cache, add, fio
# random reads (STOP=1: SIGSTOP of the first mirror 3 s in), a result whose
# value is fio's VALUE (p99 or max latency, ms).
mirror_run() {
    local c=$1 d=$2 rep=$3 what=$4 stop=$5 out st f stopper=""; shift 5
    start_mark "$c" "$d" "$rep"
    rm -f "$CDIR"/mir.*
    HTTP_URL=$1 http_add "$CDIR/mir" "${@:2}" || { err "$c" "$d" "$rep" "add: $U_ERR"; return; }
    out=/tmp/fio-$c-$d-$rep.json
    if [[ $stop == 1 ]]; then (sleep 3; kill -STOP "$(cat /run/nginx/m8091.pid)") & stopper=$!; fi
    if fio_dev "$out" "$U_DEV" "$U_PID" "${RAND_ARGS[@]}"; then
        st=$(ublk_stats "$U_ID")
        f=$(fio_json "$out")
        emit "$(jq -cn --arg c "$c" --arg d "$d" --argjson r "$rep" --arg what "$what" --argjson f "$f" --argjson st "$st" \
            --argjson cpu "$(cpu_json)" \
            '{case: $c, device: $d, rep: $r, metric: "ms", value: ((if $what == "p99" then $f.lat_p99_us else $f.lat_max_us end) / 1000),
              what: $what} + $f + {cpu: $cpu, stats: $st}')"
        log "rep $rep $c $d: p99 $(jq -r '.lat_p99_us / 1000' <<<"$f") ms, max $(jq -r '.lat_max_us / 1000' <<<"$f") ms, $(jq -r '.iops | floor' <<<"$f") IOPS, fio errors $(jq -r .fio_errors <<<"$f"); failovers $(jq -r '.failovers // "-"' <<<"$st")"
    else
        err "$c" "$d" "$rep" "fio: $(tail -n 3 /tmp/fio.stderr | tr '\n' ' ')"
    fi
    [[ -n $stopper ]] && { wait "$stopper"; kill -CONT "$(cat /run/nginx/m8091.pid)"; }
    ublk_del "$U_ID"
    rm -f "$CDIR"/mir.*
}
case_mirrors() {
    local rep=$1
    mirrors_setup || { err mirror-slow fast "$rep" "the mirrors' nginx or tc did not come up"; return; }
    mirror_link on || { err mirror-slow fast "$rep" "tc prio/netem/u32 on lo failed"; mirror_link off; return; }
    [[ $rep == 1 ]] && log "mirrors: 8091 answers in about 10 ms, 8092 in about $((MIRROR_SLOW_MS + 5)) ms (netem on lo)"
    mirror_run mirror-slow fast "$rep" p99 0 "$MA"
    mirror_run mirror-slow slow-first "$rep" p99 0 "$MB" --url "$MA"
    mirror_link off
    mirror_run mirror-stop both-up "$rep" max 0 "$MA" --url "$MB"
    mirror_run mirror-stop stopped "$rep" max 1 "$MA" --url "$MB"
}

# ---- warm devices (set up once, before the first warm case) -------------------------------------
WARM_UP=0
declare -A W_DEV=() W_PID=()
warm_setup() {
    [[ $WARM_UP == 1 ]] && return 0
    WARM_UP=1
    local t0 o
    # ublk-http: prefetch everything, then add on the filled cache.
    rm -f "$CDIR"/warm.*
    t0=$(now_us)
    if o=$(taskset -c "$SRV_CPU" timeout 300 "$UBLK" prefetch --url "$URL" --cache "$CDIR/warm.cache" --bitmap "$CDIR/warm.bitmap" 2>&1); then
        local dt=$(( $(now_us) - t0 ))
        emit "$(jq -cn --argjson us "$dt" --argjson b "$IMG_BYTES" '{case: "info", device: "ublk-http", what: "prefetch", rep: 0, seconds: ($us / 1e6), mib_s: ($b / 1048576 / ($us / 1e6))}')"
        log "prefetch of $IMG_MB MiB: $(awk -v t=$dt -v m=$IMG_MB 'BEGIN { printf "%.2f s, %.1f MiB/s", t / 1e6, m / (t / 1e6) }')"
        if http_add "$CDIR/warm"; then
            W_DEV[ublk-http]=$U_DEV W_PID[ublk-http]=$U_PID W_ID=$U_ID
            log "warm ublk-http: $U_DEV, pid $U_PID, cache_state $(jq -r .target_options.cache_state <<<"$U_JSON"), threads on CPUs $(threads_cpus "$U_PID")"
        else
            log "warm ublk-http add failed: $U_ERR"
        fi
    else
        log "prefetch failed: $o"
    fi
    # kloop: a fully downloaded copy on tmpfs, losetup --direct-io=on.
    t0=$(now_us)
    if taskset -c "$SRV_CPU" curl -s -S -f -o "$COPY" "$URL" && [[ $(stat -c %s "$COPY") == "$IMG_BYTES" ]]; then
        local dtc=$(( $(now_us) - t0 ))
        emit "$(jq -cn --argjson us "$dtc" --argjson b "$IMG_BYTES" '{case: "info", device: "curl", what: "download_to_tmpfs", rep: 0, seconds: ($us / 1e6), mib_s: ($b / 1048576 / ($us / 1e6))}')"
        log "curl download to a tmpfs file (the copy for kloop): $(awk -v t=$dtc -v m=$IMG_MB 'BEGIN { printf "%.2f s, %.1f MiB/s", t / 1e6, m / (t / 1e6) }')"
        local d dio
        if d=$("$LOSETUP" --direct-io=on -r -f --show "$COPY"); then
            dio=$(cat "/sys/block/${d#/dev/}/loop/dio" 2>/dev/null || echo "?")
            W_DEV[kloop]=$d W_PID[kloop]=""
            emit "$(jq -cn --arg d "$d" --arg dio "$dio" '{case: "info", device: "kloop", what: "device", rep: 0, path: $d, dio: $dio}')"
            log "kloop: $d over $COPY, dio=$dio"
        else
            log "losetup failed"
        fi
    else
        log "downloading the copy for kloop failed"
    fi
    # nbdkit-cache: the curl plugin behind the cache filter, filled by one whole read.
    if [[ $NBD == 1 ]]; then
        if nbd_up warm "$NBD_WARM" --filter=cache curl "url=$URL" cache-on-read=true; then
            W_DEV[nbdkit-cache]=$NBD_WARM W_PID[nbdkit-cache]=$N_PID
            t0=$(now_us)
            taskset -c "$FIO_CPU" dd if="$NBD_WARM" of=/dev/null bs=1M iflag=direct status=none || log "filling the nbdkit cache failed"
            log "nbdkit-cache: $NBD_WARM, nbdkit pid $N_PID, filled by one whole read in $(awk -v t=$(( $(now_us) - t0 )) 'BEGIN { printf "%.2f s", t / 1e6 }')"
        else
            log "nbdkit-cache setup failed"
            nbd_down "$NBD_WARM" "${N_PID:-}"
        fi
    fi
    # Unrecorded warm-up of each warm device (page faults, io-wq threads, ...).
    local d
    for d in "${!W_DEV[@]}"; do
        log "$d queue: $(qinfo "${W_DEV[$d]}")"
        taskset -c "$FIO_CPU" fio --name=warmup --filename="${W_DEV[$d]}" "${FIO_COMMON[@]}" --output=/dev/null \
            --rw=randread --bs=4k --iodepth=32 --time_based --runtime=2 >/dev/null 2>&1 || log "warm-up of $d failed"
    done
    emit "$(jq -cn --arg m "$(free -m | awk '/^Mem:/ { print $3 " used, " $7 " available" }')" '{case: "info", device: "-", what: "memory_mib", rep: 0, text: $m}')"
    log "memory with every warm device up: $(free -m | awk '/^Mem:/ { print $3 " MiB used, " $7 " MiB available" }')"
}
warm_case() { # CASE REP METRIC FIOARGS...
    local c=$1 rep=$2 metric=$3 d; shift 3
    warm_setup
    for d in ublk-http kloop nbdkit-cache; do
        [[ $d == nbdkit-cache && $NBD != 1 ]] && continue
        if [[ -z ${W_DEV[$d]:-} ]]; then err "$c" "$d" "$rep" "device not set up"; continue; fi
        if [[ -n ${W_PID[$d]} ]] && ! kill -0 "${W_PID[$d]}" 2>/dev/null; then err "$c" "$d" "$rep" "server died"; continue; fi
        local out=/tmp/fio-$c-$d-$rep.json extra="{}"
        start_mark "$c" "$d" "$rep"
        if ! fio_dev "$out" "${W_DEV[$d]}" "${W_PID[$d]}" "$@"; then
            err "$c" "$d" "$rep" "fio: $(tail -n 3 /tmp/fio.stderr | tr '\n' ' ')"; continue
        fi
        if [[ $d == ublk-http ]]; then
            extra=$(jq -cn --argjson st "$(ublk_stats "$W_ID")" '{stats: $st}')
            [[ "$(jq -r '.stats.misses // 0' <<<"$extra")" == 0 ]] || log "WARNING: the warm ublk-http device had misses: $extra"
        fi
        record "$c" "$d" "$rep" "$metric" "$out" "$extra"
    done
}
case_warm_rand4k() { warm_case warm-rand4k "$1" IOPS "${WRAND_ARGS[@]}"; }
case_warm_seq1m() { warm_case warm-seq1m "$1" MiB/s "${WSEQ_ARGS[@]}"; }

warm_teardown() {
    [[ -n ${W_ID:-} ]] && ublk_del "$W_ID"
    [[ -n ${W_DEV[kloop]:-} ]] && "$LOSETUP" -d "${W_DEV[kloop]}"
    [[ -n ${W_DEV[nbdkit-cache]:-} ]] && nbd_down "$NBD_WARM" "${W_PID[nbdkit-cache]}"
    W_ID="" W_DEV=()
}

# ---- main --------------------------------------------------------------------------------------------
http_main() {
[[ $(nproc) -ge 2 ]] || h_die "needs 2 vCPUs (vm/run.sh --smp 2)"
taskset -cp "$FIO_CPU" $$ >/dev/null      # this script, fio and nginx: vCPU 0
for c in "${CASES[@]}"; do declare -F "case_${c//-/_}" >/dev/null || h_die "unknown case $c"; done
kmod-load loop || h_die "cannot load loop"
if [[ $NBD == 1 ]]; then
    if ! kmod-load nbd nbds_max=4 || ! command -v nbdkit >/dev/null || ! command -v nbd-client >/dev/null || [[ ! -f $NBDKIT_PLUGIN ]]; then
        log "WARNING: nbd, nbdkit, nbd-client or the curl plugin missing: no nbdkit devices"
        NBD=0
    fi
fi
WQ_MASK=""
if [[ $WQ_PIN == 1 ]]; then
    if printf '%x' $((1 << SRV_CPU)) > /sys/devices/virtual/workqueue/cpumask 2>/dev/null; then
        WQ_MASK=$(cat /sys/devices/virtual/workqueue/cpumask)
        log "unbound workqueues (loop, nbd workers) restricted to vCPU $SRV_CPU (mask $WQ_MASK)"
    else
        log "WARNING: cannot restrict the unbound workqueues"
    fi
fi
mkdir -p "$WWW" "$CDIR"
t0=$SECONDS
dd if=/dev/urandom of="$IMG" bs=1M count="$IMG_MB" status=none || h_die "cannot write $IMG"
log "image: $IMG_MB MiB of random data in $((SECONDS - t0)) s"
nginx-start "$WWW" 8080 || h_die "nginx-start failed"
NGINX_PIDS=$(pgrep -x nginx | paste -sd' ')
log "nginx pids $NGINX_PIDS on CPUs $(for p in $NGINX_PIDS; do taskset -cp "$p" | sed 's/.*: //'; done | sort -u | paste -sd' ')"

jq -cn --arg kernel "$(uname -r)" --arg fio "$(fio --version)" --arg curl "$(curl --version | head -n 1)" \
    --arg nbdkit "$(nbdkit --version 2>/dev/null)" --arg nbdtm "$(nbdkit --dump-plugin curl 2>/dev/null | sed -n 's/^thread_model=//p')" \
    --arg nbdc "$(nbd-client -V 2>&1 | head -n 1)" --arg nginx "$(nginx -v 2>&1)" \
    --argjson reps "$REPS" --argjson runtime "$RUNTIME" --argjson wruntime "$WRUNTIME" --argjson wramp "$WRAMP" \
    --argjson img "$IMG_MB" --argjson req "$REQ_MB" --arg wq "$WQ_MASK" --argjson nbd "$NBD" \
    --argjson mem "$(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo)" --argjson ncpu "$(nproc --all)" \
    --arg cases "${CASES[*]}" --argjson fcpu "$FIO_CPU" --argjson scpu "$SRV_CPU" \
    '{kernel: $kernel, fio: $fio, curl: $curl, nbdkit: $nbdkit, nbdkit_curl_thread_model: $nbdtm, nbd_client: $nbdc, nginx: $nginx,
      reps: $reps, cold_rand_runtime_s: $runtime, warm_runtime_s: $wruntime, warm_ramp_s: $wramp, image_mib: $img,
      reqcount_mib: $req, unbound_wq_cpumask: $wq, nbd: ($nbd == 1), guest_mem_mib: $mem, guest_cpus: $ncpu,
      cases: ($cases | split(" ")), fio_cpu: $fcpu, server_cpu: $scpu, nginx_cpu: $fcpu, suite: "http"}' | sed 's/^/@@META /; s/$/@@/'
chan_open

# Unrecorded warm-up: one small cold read through each cold path (binaries
# paged in, first-connection costs), so that rep 1 is not special.
rm -f "$CDIR"/wu.*
if http_add "$CDIR/wu"; then
    log "ublk-http server pid $U_PID: $(taskset -p "$U_PID"), threads on CPUs $(threads_cpus "$U_PID")"
    log "ublk-http device: $(timeout 10 "$UBLK" list -n "$U_ID" | jq -c '.[0] | {queues, depth, size, target_options}'); queue: $(qinfo "$U_DEV")"
    taskset -c "$FIO_CPU" dd if="$U_DEV" of=/dev/null bs=1M count=16 iflag=direct status=none
    ublk_del "$U_ID"
else
    log "WARNING: warm-up add failed: $U_ERR"
fi
rm -f "$CDIR"/wu.*
if [[ $NBD == 1 ]]; then
    if nbd_up cold "$NBD_COLD" curl "url=$URL"; then
        log "nbdkit pid $N_PID ($NBD_MODE socket): $(taskset -p "$N_PID"); $NBD_COLD queue: $(qinfo "$NBD_COLD")"
        taskset -c "$FIO_CPU" dd if="$NBD_COLD" of=/dev/null bs=1M count=16 iflag=direct status=none
        nbd_down "$NBD_COLD" "$N_PID"
    else
        log "WARNING: nbdkit/nbd-client do not work here: $(cat /tmp/nbdkit-cold.log /tmp/nbd-client.log 2>/dev/null | tr '\n' ' ')"
        emit "$(jq -cn --arg e "$(cat /tmp/nbdkit-cold.log /tmp/nbd-client.log 2>/dev/null | tail -n 5)" '{case: "info", device: "nbdkit", what: "unavailable", rep: 0, error: $e}')"
        nbd_down "$NBD_COLD" "${N_PID:-}"
        NBD=0
    fi
fi
taskset -c "$SRV_CPU" curl -s -o /dev/null "$URL"

trap 'warm_teardown; wan_link off; mirrors_down; nginx-stop' EXIT
t_start=$SECONDS
for rep in $(seq 1 "$REPS"); do
    for c in "${CASES[@]}"; do
        "case_${c//-/_}" "$rep"
    done
    log "rep $rep/$REPS done ($((SECONDS - t_start)) s)"
done
warm_teardown
trap - EXIT
[[ $WAN_UP == 1 ]] && /usr/sbin/nginx -c /run/nginx/tls.conf -s stop 2>/dev/null
[[ $MIRRORS_UP == 1 ]] && mirrors_down
nginx-stop
echo "@@DONE@@"
}
