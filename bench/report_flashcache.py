#!/usr/bin/env python3
"""bench/report_flashcache.py DIR [--host-load-before ...]: the flashcache
suite's report (bench/run.sh --suite flashcache), from DIR/bench-console.log.

Writes DIR/results.json (meta, devices, summary per case x device, goals,
every run) and DIR/table.md, prints the table and the goals.  Standard
library only.  Per cell: IOPS (MB/s for the 1 MiB cases), the ratio to the
best kernel cache of the cell (dm-cache, dm-writecache, bcache), the hit rate
from the cache's own counters over the measured phase, CPU per I/O (the
server process for ublk-http and kublk; the whole guest's busy and system
CPU for every device, kernel caches included, as their work is in the
kernel), clat p99 (and fdatasync p99).  Exit status 1 when a run has no
result (the smoke test's criterion).
"""
import argparse
import json
import os
import re
import statistics
import sys

KERNEL = ["dmcache-wt", "dmcache-wb", "dmwritecache", "bcache-wt", "bcache-wb"]
MB_CASES = {"seqread-1m-qd8", "seqwrite-1m-qd8"}


def parse(path):
    meta, devices, runs = {}, {}, []
    rx = re.compile(r"@@(META|DEVICE|RESULT) (\{.*\})@@")
    with open(path, errors="replace") as f:
        for line in f:
            m = rx.search(line)
            if not m:
                continue
            try:
                obj = json.loads(m.group(2))
            except ValueError:
                continue
            if m.group(1) == "META":
                meta = obj
            elif m.group(1) == "DEVICE":
                devices[obj["name"]] = obj
            else:
                runs.append(obj)
    return meta, devices, runs


def delta(run, key):
    a, b = run.get("counters_before"), run.get("counters_after")
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    return b[key] - a[key]


def hit_rate(run):
    h, m = delta(run, "rh"), delta(run, "rm")
    if h is None or m is None or h + m <= 0:
        return None
    return 100.0 * h / (h + m)


def per_1k(run, key):
    w, n = delta(run, "writes"), delta(run, key)
    if not w or n is None:
        return None
    return 1000.0 * n / w


def per_io(run, ticks_key, hz):
    t = run.get(ticks_key)
    if t is None or not run.get("iops"):
        return None
    if run.get("timed", True):
        ios = run["iops"] * run.get("cpu_window_s", 0)
    else:
        ios = run.get("ios") or 0
    if ios <= 0:
        return None
    return t * 1e6 / hz / ios


def summarize(meta, runs):
    hz = meta.get("clk_tck") or 100
    cells = {}
    for r in runs:
        cells.setdefault((r["case"], r["device"]), []).append(r)
    summary = {}
    for (c, d), rs in cells.items():
        ok = [r for r in rs if "error" not in r and r.get("iops") is not None]
        # The last attempt of each rep (a disturbed run is repeated); undisturbed ones when there are.
        byrep = {}
        for r in ok:
            if r["rep"] not in byrep or r.get("attempt", 0) >= byrep[r["rep"]].get("attempt", 0):
                byrep[r["rep"]] = r
        use = [r for r in byrep.values() if not r.get("disturbed")] or list(byrep.values())
        s = {"case": c, "device": d, "runs": len(use), "runs_total": len(rs),
             "errors": [r["error"] for r in rs if "error" in r], "all_disturbed": bool(use) and all(r.get("disturbed") for r in use)}
        if use:
            med = lambda f: (statistics.median([v for v in map(f, use) if v is not None])
                             if any(f(r) is not None for r in use) else None)
            s.update({
                "iops": med(lambda r: r["iops"]),
                "mb_s": med(lambda r: r["bw_bytes"] / 1e6),
                "clat_p99_us": med(lambda r: r["clat_p99_ns"] / 1e3 if r.get("clat_p99_ns") else None),
                "sync_p99_us": med(lambda r: r["sync_p99_ns"] / 1e3 if r.get("sync_p99_ns") else None),
                "hit_rate_pct": med(hit_rate),
                "read_hits": med(lambda r: delta(r, "rh")), "read_misses": med(lambda r: delta(r, "rm")),
                "write_hits": med(lambda r: delta(r, "wh")), "write_misses": med(lambda r: delta(r, "wm")),
                "server_us_per_io": med(lambda r: per_io(r, "server_cpu_ticks", hz)),
                "guest_busy_us_per_io": med(lambda r: per_io(r, "guest_busy_ticks", hz)),
                "guest_sys_us_per_io": med(lambda r: per_io(r, "guest_sys_ticks", hz)),
                "prep_s": med(lambda r: r.get("prep_s")), "scan_s": med(lambda r: r.get("scan_s")),
                "host_other_cpu_pct": med(lambda r: r.get("host_other_cpu_pct")),
                "extra": use[-1].get("extra"), "counters_after": use[-1].get("counters_after"),
                # ublk-http's persistence cost: cycles per 1000 writes, writes held for an intent cycle.
                "writes": med(lambda r: delta(r, "writes")),
                "intent_cycles_per_1k_writes": med(lambda r: per_1k(r, "intent_cycles")),
                "full_cycles_per_1k_writes": med(lambda r: per_1k(r, "full_cycles")),
                "held_writes_pct": med(lambda r: None if per_1k(r, "writes_held_for_intent") is None else per_1k(r, "writes_held_for_intent") / 10),
            })
            s["value"] = s["mb_s"] if c in MB_CASES else s["iops"]
        summary[(c, d)] = s
    # Ratio to the best kernel cache of the cell.
    for c in {k[0] for k in summary}:
        best = max(((summary[(c, d)].get("value") or 0, d) for d in KERNEL if (c, d) in summary), default=(0, None))
        for (cc, d), s in summary.items():
            if cc == c and best[0] > 0 and s.get("value") is not None:
                s["best_kernel"] = best[1]
                s["ratio_best_kernel"] = s["value"] / best[0]
    return summary


def goals(summary):
    g = []

    def val(c, d, k="value"):
        s = summary.get((c, d))
        return None if s is None else s.get(k)

    def ratio(c, a, b, k="value"):
        x, y = val(c, a, k), val(c, b, k)
        return None if x is None or not y else x / y

    def line(goal, parts, cause=""):
        # parts: [(text, measured, ok)]
        status = "met" if parts and all(p[2] is True for p in parts) else ("unmeasured" if any(p[2] is None for p in parts) else "missed")
        g.append({"goal": goal, "status": status,
                  "measured": "; ".join(f"{t} {m}" for t, m, _ in parts), "parts": [{"what": t, "measured": m, "ok": o} for t, m, o in parts]})

    def ge(r, x):
        return None if r is None else r >= x

    def fmt(r):
        return "-" if r is None else f"{r:.2f}×"

    c = "hit-randread-4k-qd32"
    for d in ("ublk-wt", "ublk-wb"):
        s = summary.get((c, d), {})
        r1, r2 = s.get("ratio_best_kernel"), ratio(c, d, "flash-kloop")
        line(f"hits, 4k randread QD32 ({d})", [(f"vs best kernel cache ({s.get('best_kernel')})", fmt(r1), ge(r1, 1.0)),
                                              ("vs kernel loop on the flash", fmt(r2), ge(r2, 1.0))])
    c = "randwrite-4k-qd32"
    r1, r2, r3 = ratio(c, "ublk-wb", "dmcache-wb"), ratio(c, "ublk-wb", "dmwritecache"), ratio(c, "ublk-wb", "flash-kloop")
    line("write-back, 4k randwrite QD32 (ublk-wb)", [("vs dm-cache writeback", fmt(r1), ge(r1, 1.0)), ("vs dm-writecache", fmt(r2), ge(r2, 1.0)),
                                                   ("vs kernel loop on the flash", fmt(r3), ge(r3, 1.0))])
    r1, r2 = ratio(c, "ublk-wt", "dmcache-wt"), ratio(c, "ublk-wt", "slow")
    line("write-through, 4k randwrite QD32 (ublk-wt)", [("vs dm-cache writethrough", fmt(r1), ge(r1, 1.0)), ("vs the slow disk alone", fmt(r2), ge(r2, 0.9))])
    c = "zipf-7030"
    for d, k in (("ublk-wt", "dmcache-wt"), ("ublk-wb", "dmcache-wb")):
        r = ratio(c, d, k)
        h, hk = val(c, d, "hit_rate_pct"), val(c, k, "hit_rate_pct")
        line(f"zipf 70/30 over 4× the cache ({d} vs {k})",
             [("IOPS", fmt(r), ge(r, 1.0)),
              ("read hit rate", "-" if h is None or hk is None else f"{h:.1f}% vs {hk:.1f}%", None if h is None or hk is None else h >= hk - 5)])
    c = "scan"
    for d in ("ublk-wt", "ublk-wb"):
        h = val(c, d, "hit_rate_pct")
        line(f"hot-set hit rate after a scan of 4× the cache ({d})", [("hit rate", "-" if h is None else f"{h:.1f}%", None if h is None else h >= 90)])
    c = "fsync-write-4k-qd1"
    p, pk = val(c, "ublk-wb", "sync_p99_us"), val(c, "dmcache-wb", "sync_p99_us")
    w, wk = val(c, "ublk-wb", "clat_p99_us"), val(c, "dmcache-wb", "clat_p99_us")
    r = ratio(c, "ublk-wb", "dmcache-wb")
    line("4k write + fdatasync QD1, write-back (ublk-wb vs dm-cache writeback)",
         [("fdatasync p99", "-" if p is None or pk is None else f"{p:.0f} vs {pk:.0f} µs", None if p is None or pk is None else p <= pk),
          ("write clat p99", "-" if w is None or wk is None else f"{w:.0f} vs {wk:.0f} µs", None if w is None or wk is None else w <= wk),
          ("rate", fmt(r), ge(r, 1.0))])
    c = "seqread-1m-qd8"
    for d in ("ublk-wt", "ublk-wb"):
        x, y = val(c, d, "server_us_per_io"), val(c, "flash-kublk-zc", "server_us_per_io")
        line(f"1 MiB seq read hits, server CPU per I/O ({d} vs kublk --auto_zc)",
             [("server CPU per I/O", "-" if x is None or y is None else f"{x:.0f} vs {y:.0f} µs", None if x is None or y is None else x <= y)])
    g.append({"goal": "overlay device writes ≥ 0.9× http --writable", "status": "unmeasured",
              "measured": "not a flash-cache case: outside this suite", "parts": []})
    return g


def f0(x, unit=""):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}{unit}"
    if x >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def cnt(x):
    return "-" if x is None else f"{x:.0f}"


def table(meta, summary, devices_order, cases_order):
    out = ["| case | device | IOPS | MB/s | vs best kernel cache | hit rate (hits/misses) | server µs/IO | guest busy µs/IO (sys) | clat p99 | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cases_order:
        first = True
        for d in devices_order:
            s = summary.get((c, d))
            if s is None:
                continue
            if s.get("value") is None:
                out.append(f"| {c if first else ''} | {d} | ERROR | | | | | | | {'; '.join(s['errors'])[:120]} |")
                first = False
                continue
            hr = s.get("hit_rate_pct")
            hits = "-" if hr is None else f"{hr:.1f}% ({cnt(s['read_hits'])}/{cnt(s['read_misses'])})"
            if hr is None and s.get("write_hits") is not None and (s.get("write_hits") or 0) + (s.get("write_misses") or 0) > 0:
                wh, wm = s["write_hits"], s["write_misses"]
                hits = f"writes {100.0 * wh / (wh + wm):.1f}% ({cnt(wh)}/{cnt(wm)})"
            rb = s.get("ratio_best_kernel")
            rbs = "-" if rb is None else (f"**{rb:.2f}×**" if d.startswith("ublk") else f"{rb:.2f}×") + ("" if d != s.get("best_kernel") else " (best)")
            note = []
            if s.get("sync_p99_us") is not None:
                note.append(f"fdatasync p99 {f0(s['sync_p99_us'] / 1000, ' ms')}")
            if s.get("scan_s") is not None:
                note.append(f"scan {s['scan_s']:.1f} s")
            ex = s.get("extra") or {}
            if ex.get("cache_file_kb_at_end") is not None:
                note.append(f"cache file {ex['cache_file_kb_at_end'] // 1024} MiB")
            if s.get("intent_cycles_per_1k_writes") is not None:
                note.append(f"per 1000 writes: {s['intent_cycles_per_1k_writes']:.0f} intent + {s['full_cycles_per_1k_writes'] or 0:.0f} full cycles, "
                            f"{s['held_writes_pct']:.0f}% of writes held for one")
            if ex.get("flash_fs_peak_used_mb") is not None and s.get("writes"):
                note.append(f"flash fs peak {ex['flash_fs_peak_used_mb']} of {ex.get('flash_fs_mb')} MiB")
            if s.get("all_disturbed"):
                note.append("! disturbed")
            out.append(f"| {c if first else ''} | {d} | {f0(s['iops'])} | {f0(s['mb_s'])} | {rbs} | {hits} | {f0(s.get('server_us_per_io'))} | "
                       f"{f0(s.get('guest_busy_us_per_io'))} ({f0(s.get('guest_sys_us_per_io'))}) | {f0(s['clat_p99_us'] / 1000 if s.get('clat_p99_us') else None, ' ms')} | {', '.join(note)} |")
            first = False
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    for a in ("--host-load-before", "--host-load-after", "--elapsed", "--host-other-cpu", "--git", "--vm-status", "--quick", "--kernel-flavour"):
        ap.add_argument(a, default=None)
    o = ap.parse_args()
    log = os.path.join(o.dir, "bench-console.log")
    meta, devices, runs = parse(log)
    if not meta:
        print(f"report_flashcache.py: no @@META in {log}", file=sys.stderr)
        return 1
    summary = summarize(meta, runs)
    dev_order = [d for d in meta.get("devices", []) if any(k[1] == d for k in summary)]
    case_order = [c for c in meta.get("cases", []) if any(k[0] == c for k in summary)]
    g = goals(summary)
    host = {"git": o.git, "host_load_before": o.host_load_before, "host_load_after": o.host_load_after,
            "elapsed_s": o.elapsed, "host_other_cpu_pct": o.host_other_cpu, "vm_status": o.vm_status, "quick": o.quick}
    # Re-rendered (bench/run.sh --report DIR): the run's host figures from the last report.
    old = os.path.join(o.dir, "results.json")
    if all(v is None for v in host.values()) and os.path.exists(old):
        try:
            host = json.load(open(old)).get("host") or host
        except ValueError:
            pass
    o.git, o.host_load_before, o.host_load_after, o.host_other_cpu = (host.get(k) for k in ("git", "host_load_before", "host_load_after", "host_other_cpu_pct"))
    disturbed = sum(1 for r in runs if r.get("disturbed"))
    head = (f"flashcache suite: kernel {meta.get('kernel')}, {meta.get('fio')}, guest {meta.get('guest_cpus')} vCPUs / {meta.get('guest_mem_mb')} MiB; "
            f"slow disk {meta.get('slow_mb')} MiB dm-delay (reads +{meta.get('slow_read_ms')} ms, writes and flushes +{meta.get('slow_write_ms')} ms) over brd; "
            f"cache {meta.get('cache_mb')} MiB of brd flash each; hot set {meta.get('hot_mb')} MiB; "
            f"{meta.get('reps')} rep(s) x {meta.get('runtime_s')} s (+{meta.get('ramp_s')} s ramp); git {o.git}; "
            f"host: load {o.host_load_before} before, {o.host_load_after} after, other processes {o.host_other_cpu}% of a core over the run, "
            f"{disturbed} of {len(runs)} runs disturbed (repeated)")
    tab = table(meta, summary, dev_order, case_order)
    gl = ["| goal | measured | status |", "| --- | --- | --- |"] + [f"| {x['goal']} | {x['measured']} | {x['status']} |" for x in g]
    text = head + "\n\n" + tab + "\n\nGoals (ratios in one boot):\n\n" + "\n".join(gl) + "\n"
    print(text)
    with open(os.path.join(o.dir, "table.md"), "w") as f:
        f.write(text)
    res = {"host": host, "meta": meta, "devices": devices,
           "summary": [dict(v) for v in summary.values()], "goals": g, "runs": runs}
    with open(os.path.join(o.dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    plan = [tuple(x) for x in meta.get("plan") or []] or [(c, d) for c in meta.get("cases", []) for d in meta.get("devices", [])]
    missing = [f"{c}/{d}" for c, d in plan if (c, d) not in summary or summary[(c, d)].get("value") is None]
    done = any("@@DONE@@" in l for l in open(log, errors="replace"))
    if missing or not done:
        print(f"report_flashcache.py: {len(missing)} case x device cell(s) without a result{'' if done else ', and no @@DONE@@ (the guest stopped early)'}: {' '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
