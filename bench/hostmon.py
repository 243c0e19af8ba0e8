#!/usr/bin/env python3
"""bench/hostmon.py --root PID --out FILE [--chan SOCKET] -- a filter for the VM console.

Copies stdin to stdout line by line and meanwhile measures, twice a second,
how much host CPU is used by processes that are NOT descendants of PID (the
bench/run.sh shell: the VM's qemu is its descendant), i.e. the disturbance
from other work on the host (in % of one core).  Writes FILE (JSON) at the end:
  {"samples": [[t, other_pct, other_qemu], ...],  # other_qemu: qemu-system
                                                    # processes not of this run
   "marks": [[t, "START"|"RESULT", {...}], ...]}   # when the guest printed
                                                    # @@START / @@RESULT lines
so that bench/report.py can tell how disturbed each fio run was.

With --chan, it also connects to SOCKET, a qemu chardev socket behind a second
serial port of the guest (/dev/ttyS1), and answers bench/guest.sh's questions,
one line each way:
  PING          -> PONG
  WAIT MAX_S    -> "OK x" once other processes used < --quiet % over the last
                   2 s, or "BUSY x" after MAX_S seconds
  MARK          -> OK               (starts a measurement)
  STAT          -> "MEAN MAX"       (other processes' CPU since MARK)
so that the guest can wait for a quiet host and repeat disturbed runs.
Standard library only.
"""
import argparse
import json
import os
import re
import socket
import sys
import threading
import time

HZ = os.sysconf("SC_CLK_TCK")
MARK = re.compile(r"@@(START|RESULT) (\{.*?\})@@")


def host_busy():
    with open("/proc/stat") as f:
        v = f.readline().split()
    # user nice system idle iowait irq softirq steal
    return sum(int(x) for x in (v[1], v[2], v[3], v[6], v[7], v[8]))


def tree_ticks(root):
    """(CPU ticks of root and its descendants, qemu-system processes that are
    not among them: another VM on the host)."""
    parent, ticks, qemu = {}, {}, []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        if s[s.index("(") + 1:s.rindex(")")].startswith("qemu-system"):
            qemu.append(int(p))
        parent[int(p)] = int(rest[1])
        ticks[int(p)] = int(rest[11]) + int(rest[12])
    total, ours = 0, set()
    for pid, t in ticks.items():
        q, seen = pid, 0
        while q and q != root and seen < 64:
            q = parent.get(q, 0)
            seen += 1
        if q == root:
            total += t
            ours.add(pid)
    return total, sum(1 for p in qemu if p not in ours)


class Monitor:
    def __init__(self, root, interval):
        self.root, self.interval = root, interval
        self.samples, self.marks = [], []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def sampler(self):
        t0, b0, (m0, _) = time.time(), host_busy(), tree_ticks(self.root)
        while not self.stop.wait(self.interval):
            t1, b1, (m1, nq) = time.time(), host_busy(), tree_ticks(self.root)
            # A descendant that exited takes its ticks along: never negative.
            other = max(0.0, ((b1 - b0) - max(0, m1 - m0)) / HZ / (t1 - t0) * 100)
            with self.lock:
                self.samples.append([round(t1, 2), round(other, 1), nq])
            t0, b0, m0 = t1, b1, m1

    def since(self, t):
        with self.lock:
            return [x[1] for x in self.samples if x[0] > t]

    def chan(self, path, quiet):
        sock = None
        deadline = time.time() + 120
        while not self.stop.is_set() and time.time() < deadline:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                break
            except OSError:
                sock = None
                time.sleep(0.2)
        if sock is None:
            return
        f = sock.makefile("rwb", buffering=0)
        mark = time.time()
        buf = b""
        while not self.stop.is_set():
            try:
                data = sock.recv(256)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf or b"\r" in buf:
                i = min(x for x in (buf.find(b"\n"), buf.find(b"\r")) if x >= 0)
                line, buf = buf[:i].decode(errors="replace").strip(), buf[i + 1:]
                if not line:
                    continue
                words = line.split()
                reply = "ERR"
                if words[0] == "PING":
                    reply = "PONG"
                elif words[0] == "MARK":
                    mark = time.time()
                    reply = "OK"
                elif words[0] == "STAT":
                    xs = self.since(mark)
                    reply = f"{(sum(xs) / len(xs)) if xs else 0:.1f} {max(xs) if xs else 0:.1f}"
                elif words[0] == "WAIT":
                    limit = time.time() + float(words[1]) if len(words) > 1 else time.time()
                    while True:
                        xs = self.since(time.time() - 2.1)
                        cur = sum(xs) / len(xs) if xs else 0.0
                        if xs and cur < quiet:
                            reply = f"OK {cur:.1f}"
                            break
                        if time.time() >= limit or self.stop.is_set():
                            reply = f"BUSY {cur:.1f}"
                            break
                        time.sleep(0.5)
                try:
                    f.write((reply + "\n").encode())
                except OSError:
                    return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--chan", default=None)
    ap.add_argument("--quiet", type=float, default=15.0,
                    help="WAIT: other processes below this %% of a core count as quiet")
    a = ap.parse_args()
    mon = Monitor(a.root, a.interval)
    threading.Thread(target=mon.sampler, daemon=True).start()
    if a.chan:
        threading.Thread(target=mon.chan, args=(a.chan, a.quiet), daemon=True).start()
    out = sys.stdout
    for line in sys.stdin:
        out.write(line)
        out.flush()
        m = MARK.search(line)
        if m:
            try:
                with mon.lock:
                    mon.marks.append([round(time.time(), 2), m.group(1), json.loads(m.group(2))])
            except ValueError:
                pass
    mon.stop.set()
    with open(a.out, "w") as f:
        with mon.lock:
            json.dump({"samples": mon.samples, "marks": mon.marks}, f)


if __name__ == "__main__":
    main()
