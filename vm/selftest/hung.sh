#!/usr/bin/bash
# Guest side of vm/selftest.sh's negative test: provokes a hung task (a writer
# blocked on a frozen filesystem) so run.sh must exit 99.
set -euo pipefail
kmod-load brd rd_nr=1 rd_size=65536
mkfs.ext4 -q -F /dev/ram0
mkdir -p /mnt/f && mount /dev/ram0 /mnt/f
fsfreeze --freeze /mnt/f
( echo x > /mnt/f/x ) &
for _ in $(seq 90); do
    dmesg | grep -q 'blocked for more than' && break
    sleep 1
done
fsfreeze --unfreeze /mnt/f
wait
dmesg | grep 'blocked for more than' || echo "no hung task reported"
exit 0
