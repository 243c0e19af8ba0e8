#!/usr/bin/env bash
# Usage: bench/http.sh [--quick] [--reps N] [--runtime S] [--warm-runtime S]
#                      [--out DIR] [--bin PATH] [--no-build] [--label TEXT]
#                      [--wait-idle MIN] [--no-nbd] [--no-wq-pin] [--cases "..."]
#        bench/http.sh --report DIR      (re-render DIR's report from DIR/console.log)
#   Benchmarks the http target (issue: cold and warm reads of a remote image)
#   in ONE boot of the qemu TCG VM (2 vCPUs, 2 GiB; see bench/HTTP.md):
#   nginx serves a 256 MiB image in the guest; ublk-http is compared with the
#   raw curl download, the kernel loop device over a downloaded copy and
#   nbdkit's curl plugin through the kernel nbd client.  Builds the static
#   binary (tests/build-static.sh), packs $UBLK_VM_CACHE/initramfs-http-bench.cpio,
#   runs bench/http-guest.sh in the guest, then writes DIR/console.log,
#   DIR/http-monitor.json (host disturbance), DIR/http-results.json,
#   DIR/http-chart.png and prints the table and the goals.
#     --quick          1 rep, 3 s timed runs (ramp 1 s): a smoke test, ~4 min + build
#                      (the full run: 3 reps, 10 s runs, ~16 min + build)
#     --reps N         interleaved repetitions (default 3)
#     --runtime S      seconds of each cold 4k random run (default 10)
#     --warm-runtime S seconds of each warm run (default 10, after a 2 s ramp)
#     --out DIR        results directory (default bench/results)
#     --bin PATH       measure this ublk-http; --no-build: the last static build
#     --label TEXT     what was measured (default: git revision, +dirty)
#     --wait-idle MIN  wait up to MIN minutes for an idle host (no other
#                      qemu-system, other processes < 20% of a core) first
#     --no-nbd         leave the nbdkit devices out
#     --no-wq-pin      do not restrict the kernel's unbound workqueues (loop
#                      and nbd workers) to the server vCPU
#     --cases "..."    subset of: cold-seq cold-rand4k reqcount warm-rand4k warm-seq1m
#   Exit status: 0 when every run produced a result, 1 otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

QUICK=0 REPS="" RUNTIME="" WRUNTIME="" WRAMP="" OUT="$ROOT/bench/results" BIN="" BUILD=1 LABEL="" WAIT_IDLE=0
NBD=1 WQ_PIN=1 CASES="" REPORT_ONLY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --reps) REPS="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --warm-runtime) WRUNTIME="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --bin) BIN="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --label) LABEL="$2"; shift 2 ;;
        --wait-idle) WAIT_IDLE="$2"; shift 2 ;;
        --no-nbd) NBD=0; shift ;;
        --no-wq-pin) WQ_PIN=0; shift ;;
        --cases) CASES="$2"; shift 2 ;;
        --report) REPORT_ONLY="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "bench/http.sh: unknown argument $1" >&2; usage ;;
    esac
done
if [[ $QUICK == 1 ]]; then
    REPS=${REPS:-1} RUNTIME=${RUNTIME:-3} WRUNTIME=${WRUNTIME:-3} WRAMP=1
else
    REPS=${REPS:-3} RUNTIME=${RUNTIME:-10} WRUNTIME=${WRUNTIME:-10} WRAMP=2
fi
for v in REPS RUNTIME WRUNTIME; do
    [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || { echo "bench/http.sh: bad ${v,,} '${!v}'" >&2; exit 2; }
done

source "$ROOT/vm/lib.sh"
blog() { echo "[http-bench] $*" >&2; }
PY=$(command -v python3 || true)
[[ -n "$PY" ]] || { vm_ensure python3:python3; PY=$(command -v python3); }
TMPD="$(mktemp -d /tmp/http-bench.XXXXXX)"
trap 'rm -rf "$TMPD"' EXIT

# ---- the console filter: passes the console through, samples the host CPU used by
# processes that are not descendants of this script and counts other qemu-system
# processes, twice a second; times the guest's @@HTTPSTART/@@HTTPRESULT lines.
cat > "$TMPD/monitor.py" <<'PY'
import json, os, re, sys, threading, time
root, out = int(sys.argv[1]), sys.argv[2]
MARK = re.compile(r"@@HTTP(START|RESULT) (\{.*?\})@@")
def procs():
    res = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            rest = s[s.rindex(")") + 2:].split()
            comm = s[s.index("(") + 1:s.rindex(")")]
            res[int(p)] = (int(rest[1]), int(rest[11]) + int(rest[12]), comm)  # ppid, utime+stime, comm
        except (OSError, ValueError, IndexError):
            pass
    return res
def ours(ps):
    kids = {}
    for pid, (pp, _, _) in ps.items():
        kids.setdefault(pp, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(kids.get(p, []))
    return seen
def busy():
    with open("/proc/stat") as f:
        v = f.readline().split()
    return sum(int(x) for x in (v[1], v[2], v[3], v[6], v[7], v[8]))
hz = os.sysconf("SC_CLK_TCK")
samples, marks, stop = [], [], threading.Event()
def sampler():
    ps0, b0, t0 = procs(), busy(), time.time()
    while not stop.wait(0.5):
        ps1, b1, t1 = procs(), busy(), time.time()
        mine = ours(ps1)
        own = sum(max(0, ps1[p][1] - ps0.get(p, (0, ps1[p][1], ""))[1]) for p in mine if p in ps1)
        other = max(0.0, (b1 - b0 - own) / hz / (t1 - t0) * 100)
        qemus = sum(1 for p, v in ps1.items() if v[2].startswith("qemu-system") and p not in mine)
        samples.append([round(t1, 2), round(other, 1), qemus])
        ps0, b0, t0 = ps1, b1, t1
th = threading.Thread(target=sampler, daemon=True)
th.start()
for line in sys.stdin:
    sys.stdout.write(line)
    sys.stdout.flush()
    m = MARK.search(line)
    if m:
        try:
            marks.append([round(time.time(), 2), m.group(1), json.loads(m.group(2))])
        except ValueError:
            pass
stop.set()
th.join()
json.dump({"samples": samples, "marks": marks}, open(out, "w"))
PY

# ---- the report: console.log (+ http-monitor.json) -> http-results.json, table, chart -------
cat > "$TMPD/report.py" <<'PY'
import datetime, json, os, re, shutil, statistics, subprocess, sys
out_dir = sys.argv[1]
host = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
DISTURBED = 25.0   # % of a core used by other host processes during a run
LINE = re.compile(r"@@HTTP(META|RESULT) (\{.*?\})@@")
meta, runs, infos, errors, done = {}, [], [], [], False
with open(os.path.join(out_dir, "console.log"), errors="replace") as f:
    for line in f:
        done = done or "@@HTTPDONE@@" in line
        m = LINE.search(line)
        if not m:
            continue
        try:
            o = json.loads(m.group(2))
        except ValueError:
            continue
        if m.group(1) == "META":
            meta = o
        elif o.get("case") in ("info", "setup"):
            (errors if "error" in o and o.get("case") == "setup" else infos).append(o)
        else:
            runs.append(o)
# Host disturbance per run, from the monitor's samples between a run's START and RESULT.
mon_path = os.path.join(out_dir, "http-monitor.json")
if os.path.exists(mon_path):
    mon = json.load(open(mon_path))
    starts, ends = {}, {}
    for t, kind, o in mon.get("marks", []):
        k = (o.get("case"), o.get("device"), o.get("rep"))
        (starts if kind == "START" else ends)[k] = t
    for r in runs:
        k = (r.get("case"), r.get("device"), r.get("rep"))
        if k in starts and k in ends:
            xs = [s for s in mon.get("samples", []) if starts[k] < s[0] <= ends[k] + 0.5]
            if xs:
                r["host_other_cpu_pct"] = round(sum(s[1] for s in xs) / len(xs), 1)
                r["host_other_qemu"] = max(s[2] for s in xs)
                r["disturbed"] = r["host_other_cpu_pct"] > DISTURBED or r["host_other_qemu"] > 0

CASES = [  # case, unit, baseline, devices (baseline last), nbdkit device
    ("cold-seq", "MiB/s", "curl", ["ublk-http", "nbdkit-curl", "curl-file", "store", "curl"], "nbdkit-curl"),
    ("cold-rand4k", "IOPS", "nbdkit-curl", ["ublk-http", "nbdkit-curl"], "nbdkit-curl"),
    ("warm-rand4k", "IOPS", "kloop", ["ublk-http", "nbdkit-cache", "kloop"], "nbdkit-cache"),
    ("warm-seq1m", "MiB/s", "kloop", ["ublk-http", "nbdkit-cache", "kloop"], "nbdkit-cache"),
]
BASELINE_NOTE = {"curl": "curl download", "nbdkit-curl": "nbdkit-curl", "kloop": "kernel loop"}

def usable(cell):
    ok = [r for r in cell if "error" not in r and r.get("value") is not None]
    clean = [r for r in ok if not r.get("disturbed")]
    return clean if clean else ok

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

summary = {}
for c, unit, base, devs, nbd in CASES:
    for d in devs:
        cell = [r for r in runs if r["case"] == c and r["device"] == d]
        if not cell:
            continue
        ok = usable(cell)
        vals = [r["value"] for r in ok]
        s = {"case": c, "device": d, "unit": unit, "runs": len(ok), "runs_total": len(cell),
             "failed": [r["error"] for r in cell if "error" in r],
             "disturbed_runs": sum(1 for r in cell if r.get("disturbed")), "values": vals}
        if vals:
            m = med(vals)
            s.update({"median": m, "min": min(vals), "max": max(vals),
                      "rel_spread": (max(vals) - min(vals)) / m if m else None,
                      "lat_mean_us": med([r.get("lat_mean_us") for r in ok]),
                      "lat_p99_us": med([r.get("lat_p99_us") for r in ok]),
                      "cpu0_busy_pct": med([(r.get("cpu") or {}).get("cpu0_busy_pct") for r in ok]),
                      "cpu1_busy_pct": med([(r.get("cpu") or {}).get("cpu1_busy_pct") for r in ok]),
                      "server_user_pct": med([(r.get("cpu") or {}).get("server_user_pct") for r in ok]),
                      "server_sys_pct": med([(r.get("cpu") or {}).get("server_sys_pct") for r in ok])})
            st = [r.get("stats") for r in ok if r.get("stats")]
            if st:
                s["server_stats_median"] = {k: med([x.get(k) for x in st]) for k in
                                            ("hits", "misses", "bytes_fetched", "requests", "retries", "errors")
                                            if any(isinstance(x.get(k), (int, float)) for x in st)}
            rss = [r.get("rss_kb") for r in ok if r.get("rss_kb")]
            if rss:
                s["rss_kb_max"] = {k: max(x.get(k, 0) for x in rss) for k in rss[0]}
        summary[(c, d)] = s
for c, unit, base, devs, nbd in CASES:
    b = summary.get((c, base), {}).get("median")
    n = summary.get((c, nbd), {}).get("median")
    for d in devs:
        s = summary.get((c, d))
        if not s or s.get("median") is None:
            continue
        s["baseline"] = base
        if b:
            s["ratio"] = s["median"] / b
            s["ratio_min"], s["ratio_max"] = s["min"] / b, s["max"] / b
        if n and d != nbd:
            s["ratio_vs_nbdkit"] = s["median"] / n

req = [r for r in runs if r["case"] == "reqcount" and "error" not in r]
reqcount = {"values": [r["value"] for r in req], "at_dd_end": [r.get("requests_at_dd_end") for r in req],
            "goal_max": req[0]["goal_max"] if req else None, "read_mib": req[0]["read_mib"] if req else None,
            "bytes_fetched": [(r.get("stats") or {}).get("bytes_fetched") for r in req]}
cs = summary.get(("cold-seq", "ublk-http"), {})
rss_runs = [r.get("rss_kb") for r in runs if r["case"] == "cold-seq" and r["device"] == "ublk-http" and r.get("rss_kb")]
image_mib = meta.get("image_mib", 256)
bitmap_kib = image_mib * 1024 / 4 / 8 / 1024         # one bit per 4 KiB page
rss_limit_kib = 64 * 1024 + bitmap_kib
# With the cache file on tmpfs the server maps it (user-copy mode): its pages
# are the cache, in memory whether mapped or not, but count in VmRSS once
# mapped. The server's own memory is VmRSS less that mapping's resident part.
own_rss = max(x.get("VmRSS", 0) - x.get("CacheMapRss", 0) for x in rss_runs) if rss_runs else None

def g(name, got, want, cmp, note):
    met = None if got is None else (got >= want if cmp == ">=" else got <= want if cmp == "<=" else got < want)
    return {"goal": name, "value": got, "target": f"{cmp} {want:g}", "met": met, "note": note}
def ratio(c, d, key="ratio"):
    return summary.get((c, d), {}).get(key)
goals = [
    g("cold sequential vs nbdkit-curl", ratio("cold-seq", "ublk-http", "ratio_vs_nbdkit"), 2.0, ">=", "median MiB/s ratio"),
    g("cold sequential vs raw curl download", ratio("cold-seq", "ublk-http"), 0.9, ">=", "median MiB/s ratio"),
    g("warm 4k random QD32 vs kernel loop", ratio("warm-rand4k", "ublk-http"), 0.8, ">=", "median IOPS ratio"),
    g("warm 1 MiB sequential QD8 vs kernel loop", ratio("warm-seq1m", "ublk-http"), 0.8, ">=", "median MiB/s ratio"),
    g(f"Range requests for a cold {reqcount['read_mib'] or 64} MiB sequential read",
      max(reqcount["values"]) if reqcount["values"] else None, reqcount["goal_max"] or 20, "<=", "worst rep"),
    g("server RSS after the cold sequential read, without its mapping of the cache file (VmRSS - CacheMapRss, KiB)",
      own_rss, rss_limit_kib, "<",
      f"64 MiB + the {bitmap_kib:g} KiB bitmap; worst rep; with the mapped cache file: VmRSS max "
      f"{max(x.get('VmRSS', 0) for x in rss_runs) if rss_runs else '-'} KiB, VmHWM max "
      f"{max(x.get('VmHWM', 0) for x in rss_runs) if rss_runs else '-'} KiB"),
]

def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"
hdr = ["case", "device", "median", "spread (min–max, rel.)", "ratio vs baseline", "vs nbdkit", "cpu0/cpu1 busy", "server usr/sys", "runs"]
rows = []
for c, unit, base, devs, nbd in CASES:
    for d in devs:
        s = summary.get((c, d))
        if not s:
            continue
        if s.get("median") is None:
            rows.append([c, d, "FAILED", "; ".join(s["failed"])[:70], "", "", "", "", f"0/{s['runs_total']}"])
            continue
        r = "1.00 (baseline)" if d == base else (f"{s['ratio']:.2f}× {BASELINE_NOTE[base]}" if s.get("ratio") else "-")
        rn = "" if d == nbd or d == base and base != nbd else (f"{s['ratio_vs_nbdkit']:.2f}×" if s.get("ratio_vs_nbdkit") else "-")
        if d == nbd:
            rn = "1.00"
        busy = f"{s['cpu0_busy_pct'] or 0:.0f}% / {s['cpu1_busy_pct'] or 0:.0f}%"
        srv = "-" if d in ("kloop", "curl", "curl-file", "store") else f"{s['server_user_pct'] or 0:.0f}% / {s['server_sys_pct'] or 0:.0f}%"
        used = f"{s['runs']}/{s['runs_total']}" + (f" ({s['disturbed_runs']} disturbed)" if s["disturbed_runs"] else "")
        rows.append([c, d, f"{fmt(s['median'], unit)} {unit}",
                     f"{fmt(s['min'], unit)}–{fmt(s['max'], unit)} ({100 * (s['rel_spread'] or 0):.0f}%)",
                     r, rn, busy, srv, used])
if reqcount["values"]:
    rows.append(["reqcount", "ublk-http", f"{statistics.median(reqcount['values']):g} requests",
                 f"{min(reqcount['values'])}–{max(reqcount['values'])}", f"goal <= {reqcount['goal_max']}", "", "", "", str(len(req))])
widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(hdr)]
def line(cols):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
table = [line(hdr), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]

res = {"host": host, "meta": meta, "complete": done, "summary": list(summary.values()), "goals": goals,
       "reqcount": reqcount, "rss_kb_cold_seq": rss_runs, "rss_limit_kib": rss_limit_kib,
       "info": infos, "setup_errors": errors, "runs": runs}
json.dump(res, open(os.path.join(out_dir, "http-results.json"), "w"), indent=1)

# ---- chart: medians relative to each case's baseline, min–max whiskers, goals -----------
chart = os.path.join(out_dir, "http-chart.png")
if shutil.which("gnuplot"):
    colors = {"ublk-http": "#1f77b4", "nbdkit-curl": "#ff7f0e", "nbdkit-cache": "#ff7f0e", "curl": "#7f7f7f", "curl-file": "#bbbbbb", "store": "#dddddd", "kloop": "#7f7f7f"}
    import math
    dat, x, xt, groups, goal_lines, ymax, ymin = [], 0, [], [], [], 1.0, 1.0
    for c, unit, base, devs, nbd in CASES:
        present = [d for d in devs if summary.get((c, d), {}).get("ratio") is not None]
        if not present:
            continue
        x0 = x
        for d in present:
            s = summary[(c, d)]
            x += 1
            ymax, ymin = max(ymax, s["ratio_max"]), min(ymin, s["ratio_min"])
            xt.append((x, d))
            dat.append(f'{x} {s["ratio"]:.4f} {s["ratio_min"]:.4f} {s["ratio_max"]:.4f} {int(colors[d][1:], 16)} '
                       f'"{fmt(s["median"], unit)} {unit}\\n{s["ratio"]:.2f}×"')
            if d == "ublk-http":
                if c == "cold-seq":
                    goal_lines.append((x, 0.9, "0.9× curl"))
                    n = summary.get((c, nbd), {}).get("ratio")
                    if n:
                        goal_lines.append((x, 2 * n, "2× nbdkit"))
                elif c.startswith("warm"):
                    goal_lines.append((x, 0.8, "0.8× loop"))
        groups.append(((x0 + 1 + x) / 2, f"{c}\\nvs {BASELINE_NOTE[base]}"))
        x += 1
    with open(os.path.join(out_dir, "http-chart.dat"), "w") as f:
        f.write("\n".join(dat) + "\n")
    ylo = 10 ** math.floor(math.log10(min(ymin, 0.5) / 1.5))
    yhi = 10 ** math.ceil(math.log10(max(ymax, 2.0) * 2.5))
    rq = reqcount["values"]
    sub = (f"cold {reqcount['read_mib'] or 64} MiB sequential read: {max(rq) if rq else '-'} Range requests (goal <= {reqcount['goal_max'] or 20}); "
           "server RSS after the cold sequential read " + (f"{own_rss / 1024:.1f} MiB" if rss_runs else "-") + " without the mapped cache file (goal < 64 MiB + bitmap)")
    title = (f"ublk-http http target, qemu TCG, {meta.get('reps', '?')} rep(s): medians relative to each case's baseline, min–max whiskers; "
             f"{host.get('date', '')} {host.get('label', '')}")
    gp = [
        'set terminal pngcairo size 1400,760 font "sans,11"',
        f'set output "{chart}"',
        f'set title "{title}\\n{sub}"',
        "set logscale y", f"set yrange [{ylo}:{yhi}]",
        'set ylabel "median / baseline median (log scale)"',
        "set grid ytics", "set key off", "set style fill solid 0.85 border -1",
        f"set xrange [0:{x}]",
        "set xtics (" + ", ".join(f'"{t}" {p}' for p, t in xt) + ') scale 0 font ",10"',
        "set bmargin 7", f"set arrow from 0,1 to {x},1 nohead dt 2 lc rgb '#444444'",
    ]
    for gx, gt in groups:
        gp.append(f'set label "{gt}" at {gx},graph -0.07 center font ",11"')
    for gx, gy, gt in goal_lines:
        gp.append(f"set arrow from {gx - 0.45},{gy} to {gx + 0.45},{gy} nohead lw 3 lc rgb '#d62728' front")
        gp.append(f'set label "goal {gt}" at {gx + 0.47},{gy} left font ",9" tc rgb "#d62728" front')
    gp.append(f'plot "{os.path.join(out_dir, "http-chart.dat")}" using 1:2:($1-0.4):($1+0.4):({ylo}):2:5 with boxxyerror lc rgb variable, '
              '"" using 1:2:3:4 with yerrorbars lc rgb "black" pt 0 lw 1.5, '
              '"" using 1:($4*1.1):6 with labels font ",9" offset 0,1')
    with open(os.path.join(out_dir, "http-chart.gp"), "w") as f:
        f.write("\n".join(gp) + "\n")
    r = subprocess.run(["gnuplot", os.path.join(out_dir, "http-chart.gp")], capture_output=True, text=True)
    if r.returncode != 0:
        print("gnuplot failed: " + r.stderr[-500:], file=sys.stderr)

print()
print(f"ublk-http http target benchmark ({host.get('date', '')}, {host.get('label', '')}; qemu TCG, only ratios count)")
print(f"{meta.get('reps', '?')} interleaved rep(s); image {image_mib} MiB; fio/nginx on vCPU {meta.get('fio_cpu', 0)}, "
      f"servers (ublk-http, nbdkit, curl) on vCPU {meta.get('server_cpu', 1)}; unbound workqueues mask "
      f"{meta.get('unbound_wq_cpumask') or 'not restricted'}; nbdkit {meta.get('nbdkit', '-')} "
      f"(curl plugin {meta.get('nbdkit_curl_thread_model', '-')})")
if host:
    print(f"host: other processes used {host.get('other_cpu_pct', '?')}% of a core during the run; "
          f"other qemu-system seen: {host.get('other_qemu_seen', '?')}; load {host.get('load_before', '')} -> {host.get('load_after', '')}")
print()
print("\n".join(table))
print()
for i in infos:
    if i.get("what") == "prefetch":
        print(f"prefetch of the whole image (warm setup): {i['mib_s']:.1f} MiB/s")
    if i.get("what") == "download_to_tmpfs":
        print(f"curl download to a tmpfs file (the copy for kloop): {i['mib_s']:.1f} MiB/s")
    if i.get("what") == "unavailable":
        print(f"nbdkit unavailable: {i.get('error')}")
cs_st = cs.get("server_stats_median")
if cs_st:
    print(f"cold-seq ublk-http server stats (median): {cs_st}")
if rss_runs:
    print("cold-seq ublk-http RSS per rep (KiB): " + "; ".join(
        f"VmRSS {x.get('VmRSS')} VmHWM {x.get('VmHWM')} (anon {x.get('RssAnon')}, file {x.get('RssFile')}, shmem {x.get('RssShmem')}; "
        f"mapped cache file {x.get('CacheMapRss', '?')})" for x in rss_runs))
if reqcount["values"]:
    print(f"reqcount per rep: {reqcount['values']} (when dd ended: {reqcount['at_dd_end']}), bytes fetched {reqcount['bytes_fetched']}")
print()
print("goals:")
for x in goals:
    st = "n/a" if x["met"] is None else ("MET" if x["met"] else "NOT MET")
    v = "-" if x["value"] is None else (f"{x['value']:.2f}" if isinstance(x["value"], float) else str(x["value"]))
    print(f"  {st:7} {x['goal']}: {v} (goal {x['target']}; {x['note']})")
u, cf, so = (summary.get(("cold-seq", d), {}).get("median") for d in ("ublk-http", "curl-file", "store"))
if u and cf:
    print(f"context: cold sequential ublk-http / curl downloading to a file on the cache's filesystem = {u / cf:.2f}x"
          + (f"; storing {image_mib} MiB alone (dd from /dev/zero, no network) runs at {so:.1f} MiB/s" if so else ""))
for e in errors:
    print(f"setup error: {e.get('error')}")
nfail = sum(len(s["failed"]) for s in summary.values()) + sum(1 for r in runs if r["case"] == "reqcount" and "error" in r)
print(f"\nresults: {os.path.join(out_dir, 'http-results.json')}, chart: {chart}" + ("" if done else "  (INCOMPLETE: no @@HTTPDONE)"))
sys.exit(0 if done and nfail == 0 and not errors else 1)
PY

if [[ -n "$REPORT_ONLY" ]]; then
    HOSTJ="{}"
    [[ -f "$REPORT_ONLY/http-results.json" ]] && HOSTJ=$("$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get("host", {})))' "$REPORT_ONLY/http-results.json")
    set +e; "$PY" "$TMPD/report.py" "$REPORT_ONLY" "$HOSTJ"; exit $?
fi

# ---- tools (host side, to be packed into the guest) ---------------------------------------------
NBDKIT_DIR=/usr/lib/x86_64-linux-gnu/nbdkit
vm_ensure gnuplot:gnuplot-nox
[[ $NBD == 1 ]] && vm_ensure nbdkit:nbdkit /usr/sbin/nbd-client:nbd-client "$NBDKIT_DIR/plugins/nbdkit-curl-plugin.so:nbdkit"

# ---- build, initramfs ------------------------------------------------------------------------------
vm/kernel.sh >/dev/null
# What is measured: the tree's revision when it is built here (taken before the build).
if [[ -n "$LABEL" ]]; then
    REV="$LABEL"
else
    REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [[ -n "$(git status --porcelain -- Sources Package.swift 2>/dev/null)" ]] && REV+="+dirty"
    [[ -z "$BIN" && $BUILD == 1 ]] || REV="binary $(basename "${BIN:-ublk-http}") of $(date -r "${BIN:-$ROOT/.build-static/release/ublk-http}" '+%m-%d %H:%M' 2>/dev/null), tree $REV"
fi
if [[ -z "$BIN" ]]; then
    if [[ $BUILD == 1 ]]; then
        blog "building the static binary (tests/build-static.sh)"
        BIN="$(tests/build-static.sh)"
    else
        BIN="$ROOT/.build-static/release/ublk-http"
    fi
fi
[[ -x "$BIN" ]] || { echo "bench/http.sh: no binary $BIN" >&2; exit 1; }
mkdir -p "$VM_CACHE"
# One benchmark at a time (bench/run.sh takes the same lock).
exec 9>"$VM_CACHE/bench.lock"
if ! flock -n 9; then
    blog "another benchmark is running; waiting for it (up to 30 min)"
    flock -w 1800 9 || { echo "bench/http.sh: still locked: $VM_CACHE/bench.lock" >&2; exit 1; }
fi
INITRD="$VM_CACHE/initramfs-http-bench.cpio"   # uncompressed: boots faster under TCG
KVER="$(cat "$("$VM_DIR/kernel.sh")/version")"
EXTRA=()
if [[ $NBD == 1 ]]; then
    EXTRA+=(--bin "$(command -v nbdkit):/usr/bin/nbdkit" --bin /usr/sbin/nbd-client:/usr/sbin/nbd-client
            --bin "$NBDKIT_DIR/plugins/nbdkit-curl-plugin.so:$NBDKIT_DIR/plugins/nbdkit-curl-plugin.so"
            --bin "$NBDKIT_DIR/filters/nbdkit-cache-filter.so:$NBDKIT_DIR/filters/nbdkit-cache-filter.so")
fi
STAMP="$(realpath "$BIN") $(stat -c '%s %Y' "$BIN") nbd=$NBD"
if [[ ! -f "$INITRD" || "$(cat "$INITRD.bin" 2>/dev/null)" != "$STAMP" || "$(cat "$INITRD.kver" 2>/dev/null)" != "$KVER" ]] \
   || [[ -n "$(find "$VM_DIR" -type f -newer "$INITRD" -print -quit)" ]]; then
    blog "packing $INITRD with $BIN"
    rm -f "$INITRD.bin"
    vm/initramfs.sh "$INITRD" --bin "$BIN:/usr/local/bin/ublk-http" --bin /usr/bin/jq "${EXTRA[@]}" >/dev/null
    echo "$STAMP" > "$INITRD.bin"
fi

# ---- idle host -------------------------------------------------------------------------------------
host_busy() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
other_qemu() { pgrep -x -c qemu-system-x86 2>/dev/null || true; }
if [[ $WAIT_IDLE -gt 0 ]]; then
    deadline=$((SECONDS + WAIT_IDLE * 60))
    while :; do
        b0=$(host_busy); sleep 5; b1=$(host_busy)
        busy=$(( (b1 - b0) / 5 )) q=$(other_qemu)
        [[ $busy -lt 20 && ${q:-0} -eq 0 ]] && { blog "host idle (${busy}% of a core busy, no other qemu)"; break; }
        [[ $SECONDS -ge $deadline ]] && { blog "WARNING: the host is still busy (${busy}% of a core, $q qemu); running anyway"; break; }
        blog "host busy (${busy}% of a core, ${q:-0} other qemu-system), waiting"
        sleep 25
    done
fi

# ---- run ---------------------------------------------------------------------------------------------
mkdir -p "$OUT"
TIMEOUT=$(( 420 + REPS * (100 + 2 * RUNTIME + 6 * (WRUNTIME + WRAMP + 3)) ))
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
Q_BEFORE=$(other_qemu)
ENVS=(--env "HB_REPS=$REPS" --env "HB_RUNTIME=$RUNTIME" --env "HB_WARM_RUNTIME=$WRUNTIME" --env "HB_WARM_RAMP=$WRAMP"
      --env "HB_NBD=$NBD" --env "HB_WQ_PIN=$WQ_PIN")
[[ -n "$CASES" ]] && ENVS+=(--env "HB_CASES=$CASES")
blog "booting the VM: $REPS rep(s), cold random ${RUNTIME}s, warm ${WRUNTIME}s + ${WRAMP}s ramp (timeout ${TIMEOUT}s); host load $LOAD_BEFORE, other qemu-system: $Q_BEFORE"
T0=$SECONDS
set +e
for attempt in 1 2; do
    vm/run.sh --initrd "$INITRD" --mem 2048 --smp 2 --timeout "$TIMEOUT" --log "$OUT/console.log" "${ENVS[@]}" \
        bench/http-guest.sh | "$PY" "$TMPD/monitor.py" $$ "$OUT/http-monitor.json"
    VRC=${PIPESTATUS[0]}
    # A guest that died before the script started (TCG occasionally oopses at boot) boots again.
    [[ $VRC != 0 ]] && ! grep -aq '@@HTTPMETA' "$OUT/console.log" 2>/dev/null || break
    blog "the guest died before the benchmark started (status $VRC); booting again"
done
set -e
ELAPSED=$((SECONDS - T0))
[[ $VRC == 0 ]] || blog "WARNING: the VM run ended with status $VRC"
[[ -f "$OUT/console.log" ]] || { blog "no console log"; exit 1; }

HOSTJ=$("$PY" - "$OUT/http-monitor.json" "$REV" "$LOAD_BEFORE" "$(cut -d' ' -f1-3 /proc/loadavg)" "$ELAPSED" "$VRC" "$QUICK" <<'PY'
import datetime, json, sys
mon, label, lb, la, el, vrc, quick = sys.argv[1:8]
try:
    s = json.load(open(mon))["samples"]
except (OSError, ValueError, KeyError):
    s = []
print(json.dumps({"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "label": label,
                  "load_before": lb, "load_after": la, "elapsed_s": int(el), "vm_status": int(vrc), "quick": quick == "1",
                  "other_cpu_pct": round(sum(x[1] for x in s) / len(s), 1) if s else None,
                  "other_cpu_max_pct": max((x[1] for x in s), default=None),
                  "other_qemu_seen": max((x[2] for x in s), default=0)}))
PY
)
OTHER=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1]).get("other_cpu_pct"))' "$HOSTJ")
blog "VM run: ${ELAPSED}s; host CPU used by other processes meanwhile: ${OTHER}% of a core"
"$PY" -c 'import json,sys; h=json.loads(sys.argv[1]); sys.exit(0 if (h.get("other_cpu_pct") or 0) <= 15 and not h.get("other_qemu_seen") else 1)' "$HOSTJ" \
    || blog "WARNING: the host was busy with other work (other qemu-system or >15% of a core): the numbers are disturbed"
"$PY" "$TMPD/report.py" "$OUT" "$HOSTJ"
