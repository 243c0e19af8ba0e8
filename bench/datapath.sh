# Guest script (vm/run.sh): one boot, the `loop` target's data paths side by
# side against the kernel loop device (direct I/O) over the same file, on ext4
# (brd) and on tmpfs. fio pinned to CPU 0, the server to CPU 1. Prints one
# line per case: MB/s or IOPS and the ratio to the kernel loop device.
#   vm/run.sh --bin "$(tests/build-static.sh)" [--env PATHS="..."] bench/datapath.sh [SECONDS [REPS]]
# (reps alternate the order of the paths)
set -u
SECS=${1:-8}
UBLK=/usr/local/bin/ublk-http
kmod-load brd rd_nr=1 rd_size=$((320 << 10)); kmod-load loop
mkfs.ext4 -q -F /dev/ram0; mkdir -p /mnt/e; mount -t ext4 /dev/ram0 /mnt/e
dd if=/dev/urandom of=/mnt/e/f.img bs=1M count=256 status=none
dd if=/dev/urandom of=/tmp/f.img bs=1M count=256 status=none
run() { # DEV RW BS QD -> bandwidth (MB/s) or IOPS
    local out dir=read
    case $2 in *write) dir=write ;; esac
    out=$(taskset -c 0 fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --direct=1 --ioengine=io_uring \
        --runtime="$SECS" --time_based --ramp_time=1 --output-format=json 2>/dev/null)
    if [ "$3" = 4k ]; then echo "$out" | jq ".jobs[0].$dir.iops | floor"; else echo "$out" | jq ".jobs[0].$dir.bw_bytes / 1e6 | floor"; fi
}
REPS=${2:-1}
for rep in $(seq 1 $REPS); do
for fs in /mnt/e /tmp; do
    L=$(losetup -f --show --direct-io=on $fs/f.img)
    B1=$(run $L read 1M 8); B4=$(run $L randread 4k 32); BW=$(run $L write 1M 8)
    losetup -d $L
    echo "## rep $rep $fs: kernel loop (direct I/O): 1M read QD8 $B1 MB/s, 4k randread QD32 $B4 IOPS, 1M write QD8 $BW MB/s"
    paths=${PATHS:-auto-zero-copy zero-copy user-copy kernel-copy}
    [ $fs = /tmp ] && paths="inline-user-copy $paths"
    [ $((rep % 2)) = 0 ] && paths=$(echo $paths | tr ' ' '\n' | tac | tr '\n' ' ')
    for p in $paths; do
        J=$($UBLK add -t loop -f $fs/f.img --data-path $p) || { echo "$p: add failed: $J"; continue; }
        D=$(echo "$J" | jq -r .block_device); P=$(echo "$J" | jq -r .pid); N=$(echo "$J" | jq -r .dev_id)
        taskset -a -p -c 1 "$P" >/dev/null
        R1=$(run $D read 1M 8); R4=$(run $D randread 4k 32); RW=$(run $D write 1M 8)
        $UBLK del -n $N >/dev/null
        echo "$fs $p: 1M read QD8 $R1 MB/s ($(awk "BEGIN{printf \"%.2f\", $R1/$B1}")x), 4k randread QD32 $R4 IOPS ($(awk "BEGIN{printf \"%.2f\", $R4/$B4}")x), 1M write QD8 $RW MB/s ($(awk "BEGIN{printf \"%.2f\", $RW/$BW}")x)"
    done
done
done
