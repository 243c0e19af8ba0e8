#!/usr/bin/env python3
"""bench/report.py DIR [options] -- turns DIR/bench-console.log (the VM console
of one boot of a bench/run.sh run, holding @@META/@@DEVICE/@@RESULT lines
printed by bench/guest.sh) and DIR/bench-hostmon.json (host disturbance, from
bench/hostmon.py) into DIR/results.json, DIR/chart.png (gnuplot) and a table
on stdout; the http suite's report is bench/report_http.py.  For the cache
suite it adds the flash goals (FLASH_GOALS), judged within the boot, with the
server's CPU per I/O and RSS beside each ratio.
    python3 bench/report.py --goals OUT DIR...
prints the goals table over several boots (one per kernel) and writes
OUT/goals.json.  Standard library only.  Re-run it by hand to re-render:
    python3 bench/report.py bench/results
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report_http  # noqa: E402

BASELINE = "kloop"
# A fio run during which other host processes used more than this (% of one
# core, from hostmon.json) is "disturbed": left out of the medians when its
# cell has an undisturbed run.
DISTURBED = 25.0

# The loop suite: (device, case, minimum ratio of median IOPS vs the baseline).
GOALS = [
    ("ublk-loop", "randread-4k-qd32", 0.8),
    ("ublk-loop", "randwrite-4k-qd32", 0.8),
    ("ublk-loop", "seqread-1m-qd8", 0.5),
    ("ublk-null", "randread-4k-qd32", 1.0),
    ("ublk-null", "randwrite-4k-qd32", 1.0),
]
# What the C reference server ublksrv reached in the same guest (ratio vs kernel loop).
UBLKSRV_REF = {
    ("ublk-loop", "randread-4k-qd32"): 0.69,
    ("ublk-loop", "seqread-1m-qd8"): 0.21,
    ("ublk-null", "randread-4k-qd32"): 1.18,
    ("ublk-null", "seqread-1m-qd8"): 1.42,
}

# What dirty tracking costs, 4k random writes QD32, per write mode:
# (label, device with tracking, device without, case, maximum cost).
TRACKING = [
    ("write-through", "ublk-cache-through", "ublk-cache-through-notrack", "randwrite-4k-qd32", 0.05),
    ("write-back", "ublk-cache-back", "ublk-cache-back-notrack", "randwrite-4k-qd32", 0.05),
]

# The flash path (the cache suite on ext4): (goal as stated, device(s), case,
# minimum ratio vs the kernel loop device of the same boot, extra check).
# "cache hit" lines hold for both write modes (the worse one is judged).
FLASH_GOALS = [
    ("cache hit, 4k randread QD32 vs kernel loop", ["ublk-cache-through", "ublk-cache-back"], "randread-4k-qd32", 1.0, None),
    ("cache hit, 1 MiB seq read QD8 vs kernel loop, and above kublk --auto_zc",
     ["ublk-cache-through", "ublk-cache-back"], "seqread-1m-qd8", 0.9, "above-kublk-zc"),
    ("loop, 4k randread QD32 vs kernel loop", ["ublk-loop"], "randread-4k-qd32", 1.0, None),
    ("loop, 1 MiB seq read QD8 vs kernel loop", ["ublk-loop"], "seqread-1m-qd8", 0.9, None),
    ("write-back, 4k randwrite QD32 vs kernel loop", ["ublk-cache-back"], "randwrite-4k-qd32", 1.0, None),
    ("write-through, 4k randwrite QD32 vs kernel loop", ["ublk-cache-through"], "randwrite-4k-qd32", 0.9, None),
    ("-q 2 vs -q 1, 2 fio jobs (one per vCPU), cache hits (4k randread QD32 each)", ["ublk-cache-q2"], "randread-4k-qd32-2j", None, "q2-vs-q1"),
]
Q1_DEVICE = "ublk-cache-q1"         # the -q 1 side of the -q 2 comparison (not pinned either)

LINE = re.compile(r"@@(META|DEVICE|RESULT) (\{.*?\})@@")


def parse_console(path):
    meta, devices, runs, bad = {}, [], [], 0
    done = False
    with open(path, "r", errors="replace") as f:
        for line in f:
            if "@@DONE@@" in line:
                done = True
            m = LINE.search(line)
            if not m:
                continue
            try:
                obj = json.loads(m.group(2))
            except ValueError:
                bad += 1
                continue
            if m.group(1) == "META":
                meta = obj
            elif m.group(1) == "DEVICE":
                devices.append(obj)
            else:
                runs.append(obj)
    return meta, devices, runs, bad, done


def annotate(runs, hostmon_path):
    """Adds host_other_cpu_pct (mean over the run) and disturbed to each run."""
    if not os.path.exists(hostmon_path):
        return False
    hm = json.load(open(hostmon_path))
    samples, starts = hm.get("samples", []), {}
    ends = {}
    for t, kind, o in hm.get("marks", []):
        key = (o.get("case"), o.get("device"), o.get("rep"), o.get("attempt", 0))
        (starts if kind == "START" else ends)[key] = t
    for r in runs:
        if r.get("host_other_cpu_pct") is not None and r.get("disturbed") is not None:
            continue        # the guest asked hostmon.py itself
        key = (r.get("case"), r.get("device"), r.get("rep"), r.get("attempt", 0))
        t0, t1 = starts.get(key), ends.get(key)
        if t0 is None or t1 is None:
            continue
        xs = [x[1] for x in samples if t0 < x[0] <= t1 + 0.25]
        if xs:
            r["host_other_cpu_pct"] = round(sum(xs) / len(xs), 1)
            r["host_other_cpu_max_pct"] = max(xs)
            r["disturbed"] = r["host_other_cpu_pct"] > DISTURBED
    return True


def usable(runs):
    """The runs a cell's medians use: the undisturbed ones if any, else all."""
    ok = [r for r in runs if "error" not in r]
    clean = [r for r in ok if not r.get("disturbed")]
    return clean if clean else ok


def fmt_k(v):
    if v is None:
        return "-"
    if v >= 100000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def fmt_lat(ns):
    if ns is None:
        return "-"
    us = ns / 1000
    if us >= 10000:
        return f"{us / 1000:.1f} ms"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs"


def fmt_us(v):
    return "-" if v is None else (f"{v:.0f}" if v >= 10 else f"{v:.1f}")


def fmt_kib(v):
    return "-" if not v else f"{v / 1024:.0f} MiB" if v >= 10240 else f"{v / 1024:.1f} MiB"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(meta, devices, runs):
    cases = meta.get("cases") or sorted({r["case"] for r in runs})
    devs = meta.get("devices") or [d["name"] for d in devices]
    rows = []
    for c in cases:
        base = [r["iops"] for r in usable([r for r in runs if r["case"] == c and r["device"] == BASELINE])]
        base_med = med(base)
        for d in devs:
            refused = next((r["refused"] for r in runs if r["case"] == c and r["device"] == d and "refused" in r), None)
            if refused:
                rows.append({"case": c, "device": d, "runs": 0, "failed_runs": 0, "runs_total": 0, "disturbed_runs": 0,
                             "all_disturbed": False, "errors": [], "refused": refused})
                continue
            cell = [r for r in runs if r["case"] == c and r["device"] == d and "refused" not in r]
            ok = usable(cell)
            failed = [r for r in cell if "error" in r]
            if not ok and not failed:
                continue
            iops = [r["iops"] for r in ok]
            row = {"case": c, "device": d, "runs": len(ok), "failed_runs": len(failed),
                   "disturbed_runs": sum(1 for r in cell if r.get("disturbed")),
                   "runs_total": len(cell), "used_reps": [r["rep"] for r in ok],
                   "all_disturbed": bool(ok) and all(r.get("disturbed") for r in ok),
                   "errors": sorted({r["error"] for r in failed})}
            if ok:
                m = med(iops)
                row.update({
                    "iops_median": m, "iops_min": min(iops), "iops_max": max(iops),
                    "iops_rel_spread": (max(iops) - min(iops)) / m if m else None,
                    "mib_s_median": med([r["bw_bytes"] / 1048576 for r in ok]),
                    "lat_mean_ns_median": med([r["lat_mean_ns"] for r in ok]),
                    "lat_p99_ns_median": med([r.get("lat_p99_ns") for r in ok]),
                    "lat_p99_ns_min": min(r.get("lat_p99_ns") or 0 for r in ok),
                    "lat_p99_ns_max": max(r.get("lat_p99_ns") or 0 for r in ok),
                    "server_cpu_pct_median": med([r.get("server_cpu_pct") for r in ok]),
                    "server_iowq_cpu_pct_median": med([r.get("server_iowq_cpu_pct") for r in ok]),
                    "server_iowq_cpus": sorted({c for r in ok for c in (r.get("server_iowq_cpus") or "").split()}),
                    "cpu_fio_busy_pct_median": med([r.get("cpu_fio_busy_pct") for r in ok]),
                    "cpu_server_busy_pct_median": med([r.get("cpu_server_busy_pct") for r in ok]),
                    # Writes and persistence cycles the server counted (ublk-http caching devices).
                    "writes_held_pct_median": med([100 * r["persistence"]["writes_held_for_intent"] / r["persistence"]["writes"]
                                                   for r in ok if (r.get("persistence") or {}).get("writes")]),
                    "intent_cycles_per_1k_writes_median": med([1000 * r["persistence"]["intent_cycles"] / r["persistence"]["writes"]
                                                               for r in ok if (r.get("persistence") or {}).get("writes")]),
                    "full_cycles_per_1k_writes_median": med([1000 * r["persistence"]["full_cycles"] / r["persistence"]["writes"]
                                                             for r in ok if (r.get("persistence") or {}).get("writes")]),
                    "ratio_vs_baseline": m / base_med if base_med else None,
                    "ratio_min": min(iops) / base_med if base_med else None,
                    "ratio_max": max(iops) / base_med if base_med else None,
                    "ublksrv_ratio_ref": UBLKSRV_REF.get((d, c)),
                    # CPU per I/O: the server process (utime+stime of all its
                    # threads) and the whole server vCPU (the server, its
                    # io-wq, the driver's and the loop workers' kernel time:
                    # comparable with the kernel loop device), in µs.
                    "server_cpu_us_per_io": med([r["server_cpu_pct"] * 1e4 / r["iops"] for r in ok
                                                 if r.get("server_cpu_pct") is not None and r.get("iops")]),
                    "vcpu_server_us_per_io": med([r["cpu_server_busy_pct"] * 1e4 / r["iops"] for r in ok
                                                  if r.get("cpu_server_busy_pct") is not None and r.get("iops")]),
                    "vcpu_fio_us_per_io": med([r["cpu_fio_busy_pct"] * 1e4 / r["iops"] for r in ok
                                               if r.get("cpu_fio_busy_pct") is not None and r.get("iops")]),
                    "server_rss_kb_max": max((r.get("server_rss_kb") or 0 for r in ok), default=0) or None,
                    "server_hwm_kb_max": max((r.get("server_hwm_kb") or 0 for r in ok), default=0) or None,
                })
            rows.append(row)
    return cases, devs, rows


def goals(rows):
    out = []
    for d, c, want in GOALS:
        row = next((r for r in rows if r["device"] == d and r["case"] == c), None)
        if row is None:
            continue        # not in this suite
        got = row.get("ratio_vs_baseline") if row else None
        out.append({"device": d, "case": c, "goal": want, "ratio": got,
                    "met": None if got is None else got >= want,
                    "ublksrv_ref": UBLKSRV_REF.get((d, c))})
    return out


def cell(rows, d, c):
    return next((r for r in rows if r["device"] == d and r["case"] == c), None)


def flash_goals(rows, meta, devices=()):
    """The flash goals within one boot: per goal the measured ratio(s), met or
    missed, and beside them the numbers a cause is read from (CPU per I/O of
    the server and of the server vCPU, the kernel loop device's vCPU per I/O,
    RSS).  A device refused on this kernel or binary is listed as refused."""
    out = []
    for name, devs, c, want, extra in FLASH_GOALS:
        got = {}
        for d in devs:
            r = cell(rows, d, c)
            if r is None:
                continue
            if r.get("refused"):
                got[d] = {"refused": r["refused"]}
            else:
                got[d] = {"ratio": r.get("ratio_vs_baseline"), "iops": r.get("iops_median"),
                          "server_cpu_us_per_io": r.get("server_cpu_us_per_io"),
                          "vcpu_server_us_per_io": r.get("vcpu_server_us_per_io"),
                          "server_rss_kb": r.get("server_rss_kb_max"),
                          "data_path": next(((x.get("extra") or {}).get("data_path") for x in devices
                                             if x.get("name") == d), None)}
        if not got:
            continue
        base = cell(rows, BASELINE, c) or {}
        g = {"goal": name, "case": c, "devices": got, "min_ratio": want,
             "kloop_vcpu_us_per_io": base.get("vcpu_server_us_per_io"), "kernel": meta.get("kernel")}
        ratios = [v["ratio"] for v in got.values() if v.get("ratio") is not None]
        if extra == "q2-vs-q1":
            q2 = got.get("ublk-cache-q2", {})
            q1 = cell(rows, Q1_DEVICE, c) or {}
            g["q1"] = {"device": Q1_DEVICE, "ratio": q1.get("ratio_vs_baseline"), "iops": q1.get("iops_median"),
                       "server_cpu_us_per_io": q1.get("server_cpu_us_per_io"),
                       "vcpu_server_us_per_io": q1.get("vcpu_server_us_per_io"), "server_rss_kb": q1.get("server_rss_kb_max")}
            if q2.get("refused"):
                g["status"], g["value"] = "refused", None
            elif q2.get("iops") and q1.get("iops_median"):
                g["value"] = q2["iops"] / q1["iops_median"]
                g["status"] = "reported"
            else:
                g["status"], g["value"] = "n/a", None
        elif any(v.get("refused") for v in got.values()) and not ratios:
            g["status"], g["value"] = "refused", None
        elif not ratios:
            g["status"], g["value"] = "n/a", None
        else:
            g["value"] = min(ratios)
            met = g["value"] >= want
            if extra == "above-kublk-zc":
                z = cell(rows, "kublk-zc", c) or {}
                g["kublk_zc_ratio"] = z.get("ratio_vs_baseline")
                g["kublk_zc_refused"] = z.get("refused")
                if z.get("ratio_vs_baseline") is not None:
                    met = met and g["value"] > z["ratio_vs_baseline"]
            g["status"] = "met" if met else "missed"
        out.append(g)
    return out


def goals_lines(gl, kernel_label):
    """Markdown rows of the goals table for one boot."""
    lines = []
    for g in gl:
        parts = []
        for d, v in g["devices"].items():
            short = d.replace("ublk-cache-", "").replace("ublk-", "")
            if v.get("refused"):
                parts.append(f"{short}: refused")
            elif v.get("ratio") is not None:
                parts.append(f"{short} {v['ratio']:.2f}×" + (f" [{v['data_path']}]" if v.get("data_path") else ""))
        if g.get("q1"):
            q1 = g["q1"]
            val = "refused" if g["status"] == "refused" else (
                f"-q 2 / -q 1 = {g['value']:.2f}×" if g.get("value") is not None else "-")
            if q1.get("ratio") is not None:
                val += f" (-q 1: {q1['ratio']:.2f}× loop)"
            cpu = (f"q1 {fmt_us(q1.get('server_cpu_us_per_io'))}" +
                   "".join(f", q2 {fmt_us(v.get('server_cpu_us_per_io'))}" for v in g["devices"].values() if not v.get("refused")))
            rss = fmt_kib(q1.get("server_rss_kb"))
        else:
            val = ", ".join(parts)
            if g.get("kublk_zc_ratio") is not None:
                val += f"; kublk --auto_zc {g['kublk_zc_ratio']:.2f}×"
            elif g.get("kublk_zc_refused"):
                val += "; kublk --auto_zc refused"
            cpu = ", ".join(f"{fmt_us(v.get('server_cpu_us_per_io'))} / {fmt_us(v.get('vcpu_server_us_per_io'))}"
                            for v in g["devices"].values() if not v.get("refused"))
            cpu += f" (kloop vCPU1 {fmt_us(g.get('kloop_vcpu_us_per_io'))})"
            rss = ", ".join(fmt_kib(v.get("server_rss_kb")) for v in g["devices"].values() if not v.get("refused"))
        target = "reported" if g["min_ratio"] is None else f">= {g['min_ratio']:.1f}×" + (
            ", > kublk --auto_zc" if "kublk" in g["goal"] else "")
        lines.append(f"| {g['goal']} | {kernel_label} | {target} | {val} | {g['status'].upper()} | {cpu} | {rss} | |")
    return lines


GOALS_HDR = ["| goal | kernel (boot) | goal | measured (ratio vs kernel loop, same boot) | met? "
             "| CPU µs/IO server / server vCPU | server RSS | cause of a miss (measured) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]


def combine(out, dirs):
    """The goals table over several boots (one per kernel), and the ratios of
    every case x device side by side."""
    boots = []
    for d in dirs:
        p = os.path.join(d, "results.json")
        if not os.path.exists(p):
            print(f"[bench] no {p}", file=sys.stderr)
            continue
        boots.append((d, json.load(open(p))))
    if not boots:
        return 1
    print()
    print("The flash path: goals, each ratio within one boot (vs the kernel loop device of that boot)")
    lines = list(GOALS_HDR)
    for d, b in boots:
        lines += goals_lines(b.get("flash_goals", []), b["meta"].get("kernel", os.path.basename(d)))
    print("\n".join(lines))
    print()
    print("Ratios vs the kernel loop device, side by side (median IOPS; each within its own boot)")
    keys = []
    for _, b in boots:
        for r in b["summary"]:
            k = (r["case"], r["device"])
            if k not in keys:
                keys.append(k)
    hdr = "| case | device | " + " | ".join(b["meta"].get("kernel", "?") for _, b in boots) + " |"
    print(hdr)
    print("|" + " --- |" * (2 + len(boots)))
    for c, dv in keys:
        cols = []
        for _, b in boots:
            r = next((r for r in b["summary"] if r["case"] == c and r["device"] == dv), None)
            if r is None:
                cols.append("")
            elif r.get("refused"):
                cols.append("refused")
            elif r.get("ratio_vs_baseline") is None:
                cols.append("FAILED" if not r.get("runs") else "-")
            else:
                cols.append(f"{r['ratio_vs_baseline']:.2f}× ({fmt_us(r.get('server_cpu_us_per_io'))} µs/IO, "
                            f"{fmt_kib(r.get('server_rss_kb_max'))})" if r.get("server_cpu_us_per_io") is not None
                            else f"{r['ratio_vs_baseline']:.2f}×")
        print(f"| {c} | {dv} | " + " | ".join(cols) + " |")
    doc = {"boots": [{"dir": d, "kernel": b["meta"].get("kernel"), "host": b.get("host"),
                      "flash_goals": b.get("flash_goals", [])} for d, b in boots]}
    with open(os.path.join(out, "goals.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\ngoals: {os.path.join(out, 'goals.json')}")
    return 0


def tracking(runs):
    """The cost of dirty tracking: 1 - IOPS with / IOPS without, from the
    medians, and per rep (the two devices' runs of one rep are neighbours in
    time, so a rep's pair shares its disturbances).  Conclusive when every
    rep's cost is on the same side of the goal."""
    out = []
    for label, on, off, c, most in TRACKING:
        a = {r["rep"]: r["iops"] for r in usable([r for r in runs if r["device"] == on and r["case"] == c])}
        b = {r["rep"]: r["iops"] for r in usable([r for r in runs if r["device"] == off and r["case"] == c])}
        if not a or not b:
            continue
        ma, mb = med(list(a.values())), med(list(b.values()))
        cost = 1 - ma / mb
        per_rep = sorted(1 - a[k] / b[k] for k in a if k in b)
        if per_rep and all(x < most for x in per_rep):
            verdict = "MET"
        elif per_rep and all(x >= most for x in per_rep):
            verdict = "NOT MET"
        else:
            verdict = "MET (median; reps straddle the goal)" if cost < most else "NOT MET (median; reps straddle the goal)"
        out.append({"mode": label, "device": on, "without": off, "case": c, "iops_with": ma, "iops_without": mb,
                    "cost": cost, "cost_per_rep": per_rep, "goal_max": most, "verdict": verdict})
    return out


def table(rows):
    hdr = ["case", "device", "IOPS (median)", "spread (min–max, rel.)", "MiB/s", "mean lat", "p99",
           "ratio vs loop", "server CPU (io-wq)", "µs/IO srv / vCPU1", "RSS", "cpu0 / cpu1 busy", "runs"]
    lines = []
    for r in rows:
        if r.get("refused"):
            lines.append([r["case"], r["device"], "refused", r["refused"][:60], "", "", "", "", "", "", "", "", ""])
            continue
        if not r["runs"]:
            lines.append([r["case"], r["device"], "FAILED", "; ".join(r["errors"])[:60], "", "", "", "", "", "", "", "", ""])
            continue
        spread = f"{fmt_k(r['iops_min'])}–{fmt_k(r['iops_max'])} ({100 * r['iops_rel_spread']:.0f}%)"
        ratio = "-" if r["ratio_vs_baseline"] is None else f"{r['ratio_vs_baseline']:.2f}×"
        if r["device"] == BASELINE:
            ratio = "1.00 (baseline)"
        scpu = r["server_cpu_pct_median"]
        busy = f"{r['cpu_fio_busy_pct_median'] or 0:.0f}% / {r['cpu_server_busy_pct_median'] or 0:.0f}%"
        extra = f" ({r['failed_runs']} failed)" if r["failed_runs"] else ""
        used = f"{r['runs']}/{r['runs_total']}" + ("*" if r["runs"] < r["runs_total"] - r["failed_runs"] else "")
        if r["all_disturbed"]:
            used += " !"
        lines.append([r["case"], r["device"], fmt_k(r["iops_median"]) + extra, spread,
                      f"{r['mib_s_median']:.1f}", fmt_lat(r["lat_mean_ns_median"]), fmt_lat(r["lat_p99_ns_median"]),
                      ratio, "-" if scpu is None else f"{scpu:.0f}% ({r['server_iowq_cpu_pct_median'] or 0:.0f}%)",
                      f"{fmt_us(r.get('server_cpu_us_per_io'))} / {fmt_us(r.get('vcpu_server_us_per_io'))}",
                      fmt_kib(r.get("server_rss_kb_max")), busy, used])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    def fmt(cols):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    out = [fmt(hdr), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    prev = None
    for l in lines:
        out.append(fmt([l[0] if l[0] != prev else ""] + l[1:]))
        prev = l[0]
    persist = [r for r in rows if r.get("runs") and r.get("intent_cycles_per_1k_writes_median") is not None]
    if persist:
        out += ["", "Writes of the caching devices and what they cost in persistence (server counters, per run, median):", ""]
        for r in persist:
            out.append(f"- {r['case']} {r['device']}: {r['writes_held_pct_median']:.0f}% of writes waited for an intent cycle; "
                       f"{r['intent_cycles_per_1k_writes_median']:.1f} intent and {r['full_cycles_per_1k_writes_median']:.1f} "
                       f"full cycles per 1000 writes")
    return "\n".join(out)


def gp_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def chart(outdir, cases, devs, rows, title, goal_list=()):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("[bench] gnuplot not found: no chart", file=sys.stderr)
        return None
    n = len(devs)
    w = 0.8 / max(n, 1)
    dat = os.path.join(outdir, "chart.dat")
    with open(dat, "w") as f:
        for j, d in enumerate(devs):
            f.write(f"# device {d}: x ratio rmin rmax p99_us p99min_us p99max_us label\n")
            for i, c in enumerate(cases):
                r = next((r for r in rows if r["case"] == c and r["device"] == d and r["runs"]), None)
                x = i + (j - (n - 1) / 2) * w
                if r is None or r["ratio_vs_baseline"] is None:
                    f.write(f"{x:.4f} NaN NaN NaN NaN NaN NaN \"\"\n")
                    continue
                f.write(f"{x:.4f} {r['ratio_vs_baseline']:.4f} {r['ratio_min']:.4f} {r['ratio_max']:.4f} "
                        f"{r['lat_p99_ns_median'] / 1000:.2f} {r['lat_p99_ns_min'] / 1000:.2f} "
                        f"{r['lat_p99_ns_max'] / 1000:.2f} \"{r['ratio_vs_baseline']:.2f}\"\n")
            f.write("\n\n")
        # goals: index n
        f.write("# goals: x-w/2 goal w label\n")
        wrote = False
        for d, c, g in goal_list:
            if d in devs and c in cases:
                x = cases.index(c) + (devs.index(d) - (n - 1) / 2) * w
                f.write(f"{x - w / 2:.4f} {g} {w:.4f}\n")
                wrote = True
        if not wrote:
            f.write("0 NaN 0\n")
    xtics = ", ".join(f"{gp_quote(c)} {i}" for i, c in enumerate(cases))
    goal_plot = ((", \\\n     " + gp_quote(dat) + f" index {n} using 1:2:3:(0) with vectors nohead lw 3 "
                  'lc rgb "#d62728" title "goal"') if wrote else "")
    colors = ["#4d4d4d", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    gp = os.path.join(outdir, "chart.gp")
    png = os.path.join(outdir, "chart.png")
    names = " ".join(devs)
    with open(gp, "w") as f:
        f.write(f"""set terminal pngcairo size 1500,620 font "sans,11"
set output {gp_quote(png)}
set multiplot layout 1,2 title {gp_quote(title)} font "sans,12"
set style fill solid 0.85 border -1
set boxwidth {w * 0.92:.4f}
set xtics ({xtics}) nomirror
set xrange [-0.6:{len(cases) - 0.4}]
set grid ytics lc rgb "#dddddd"
set key outside bottom center horizontal
devs = {gp_quote(names)}
cw = {w * 0.15:.4f}
""")
        for j in range(n):
            f.write(f"set linetype {j + 1} lc rgb {gp_quote(colors[j % len(colors)])} lw 1.2\n")
        f.write(f"""set title "IOPS relative to the kernel loop device (median; whiskers: min-max of the reps; dashes: goals)"
set ylabel "ratio of median IOPS vs kernel loop"
set yrange [0:*]
set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 2 lc rgb "#888888"
plot for [j=0:{n - 1}] {gp_quote(dat)} index j using 1:2 with boxes lt j+1 title word(devs, j+1), \\
     for [j=0:{n - 1}] {gp_quote(dat)} index j using 1:3:(0):($4-$3) with vectors nohead lc rgb "black" notitle, \\
     for [j=0:{n - 1}] {gp_quote(dat)} index j using ($1-cw):3:(2*cw):(0) with vectors nohead lc rgb "black" notitle, \\
     for [j=0:{n - 1}] {gp_quote(dat)} index j using ($1-cw):4:(2*cw):(0) with vectors nohead lc rgb "black" notitle, \\
     for [j=0:{n - 1}] {gp_quote(dat)} index j using 1:4:8 with labels offset 0,0.8 font "sans,10" notitle{goal_plot}
unset arrow 1
set title "p99 latency (median; whiskers: min-max), log scale"
set ylabel "p99 completion latency (µs)"
set logscale y
set yrange [*:*]
set format y "%.0f"
plot for [j=0:{n - 1}] {gp_quote(dat)} index j using 1:5 with boxes lt j+1 title word(devs, j+1), \\
     for [j=0:{n - 1}] {gp_quote(dat)} index j using 1:6:(0):($7-$6) with vectors nohead lc rgb "black" notitle, \\
     for [j=0:{n - 1}] {gp_quote(dat)} index j using ($1-cw):6:(2*cw):(0) with vectors nohead lc rgb "black" notitle, \\
     for [j=0:{n - 1}] {gp_quote(dat)} index j using ($1-cw):7:(2*cw):(0) with vectors nohead lc rgb "black" notitle
unset multiplot
""")
    r = subprocess.run([gnuplot, gp], capture_output=True, text=True)
    if r.returncode != 0:
        print("[bench] gnuplot failed:\n" + r.stderr, file=sys.stderr)
        return None
    return png


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--goals":
        if len(sys.argv) < 4:
            sys.exit("usage: report.py --goals OUT DIR...")
        sys.exit(combine(sys.argv[2], sys.argv[3:]))
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--kernel-flavour", default=None)
    ap.add_argument("--host-load-before", default=None)
    ap.add_argument("--host-load-after", default=None)
    ap.add_argument("--elapsed", type=int, default=None)
    ap.add_argument("--host-other-cpu", type=int, default=None)
    ap.add_argument("--git", default=None)
    ap.add_argument("--vm-status", type=int, default=None)
    ap.add_argument("--quick", type=int, default=None)
    a = ap.parse_args()
    console = os.path.join(a.dir, "bench-console.log")
    res_path = os.path.join(a.dir, "results.json")
    if os.path.exists(console):
        meta, devices, runs, bad, done = parse_console(console)
        host = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "load_before": a.host_load_before, "load_after": a.host_load_after,
                "elapsed_s": a.elapsed, "other_cpu_pct": a.host_other_cpu, "git": a.git, "vm_status": a.vm_status,
                "quick": bool(a.quick) if a.quick is not None else None,
                "unparsable_lines": bad, "guest_finished": done, "kernel_flavour": a.kernel_flavour}
        if a.host_load_before is None and os.path.exists(res_path):   # re-render: keep the old host facts
            host = json.load(open(res_path)).get("host", host)
    elif os.path.exists(res_path):
        old = json.load(open(res_path))
        meta, devices, runs, host = old["meta"], old["devices"], old["runs"], old["host"]
    else:
        sys.exit(f"no {console} and no {res_path}")
    hm_path = os.path.join(a.dir, "bench-hostmon.json")
    if os.path.exists(hm_path) and "other_qemu_seen" not in host:
        try:
            xs = json.load(open(hm_path)).get("samples", [])
            host["other_qemu_seen"] = max(((x[2] if len(x) > 2 else 0) for x in xs), default=0)
            host["other_cpu_max_pct"] = max((x[1] for x in xs), default=None)
        except (OSError, ValueError):
            pass
    if meta.get("suite") == "http":
        host["label"] = host.get("label") or host.get("git")
        sys.exit(report_http.report(a.dir, host))
    if not runs:
        sys.exit("[bench] no @@RESULT lines in the console log")
    have_hm = annotate(runs, os.path.join(a.dir, "bench-hostmon.json"))
    if have_hm:
        host["disturbed_runs"] = sum(1 for r in runs if r.get("disturbed"))
    cases, devs, rows = summarize(meta, devices, runs)
    gl = goals(rows) if meta.get("suite", "loop") == "loop" else []
    tr = tracking(runs)
    fg = flash_goals(rows, meta, devices) if meta.get("suite") == "cache" else []
    doc = {"host": host, "meta": meta, "devices": devices, "summary": rows, "goals": gl,
           "tracking_cost": tr, "flash_goals": fg, "runs": runs}
    with open(res_path, "w") as f:
        json.dump(doc, f, indent=1)

    print()
    print(f"ublk-http benchmark, {host.get('date')}, git {host.get('git')}: qemu TCG guest "
          f"({meta.get('guest_cpus')} vCPUs, kernel {meta.get('kernel')}, {meta.get('fio')}), "
          f"{meta.get('reps')} rep(s) x {meta.get('runtime_s')} s (+{meta.get('ramp_s')} s ramp), "
          f"fio on CPU {meta.get('fio_cpu')}, server on CPU {meta.get('server_cpu')}, "
          f"unbound workqueues (loop workers) on CPU mask {meta.get('unbound_wq_cpumask', '?')}, scheduler {meta.get('scheduler')}")
    for d in devices:
        if d.get("refused"):
            print(f"  {d['name']}: REFUSED -- {d['refused']}")
            continue
        aff = f", server pid {d['server_pid']} on CPU(s) {d['server_affinity']}" if d.get("server_pid") else ""
        print(f"  {d['name']}: {d['path']} -- {d['note']}{aff}")
    print(f"  host load before {host.get('load_before')}, after {host.get('load_after')}; "
          f"CPU used by other host processes during the run: {host.get('other_cpu_pct')}% of a core; "
          f"wall time {host.get('elapsed_s')} s")
    oc = host.get("other_cpu_pct")
    if oc is not None and oc > 15:
        print(f"  WARNING: other host processes used {oc}% of a core during the run: the numbers are disturbed")
    if have_hm:
        nd = host["disturbed_runs"]
        print(f"  {nd} of {len(runs)} fio runs were disturbed (other host processes > {DISTURBED:.0f}% of a core "
              f"during the run); a cell's medians leave them out when it has undisturbed runs "
              f"(runs column: used/total, * = some left out, ! = all disturbed: do not trust that cell)")
    print()
    print(table(rows))
    print()
    if gl:
        print("Goals of the loop suite, ratio of median IOPS vs the kernel loop device:")
    for g in gl:
        ref = f"; ublksrv reached {g['ublksrv_ref']:.2f}" if g["ublksrv_ref"] else ""
        got = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"
        verdict = "n/a" if g["met"] is None else ("MET" if g["met"] else "NOT MET")
        print(f"  {g['device']:<10} {g['case']:<18} >= {g['goal']:.1f}: {got:>5}  {verdict}{ref}")
    if tr:
        print("Goal: dirty tracking costs < 5% (1 - IOPS with tracking / without):")
    for t in tr:
        reps = ", ".join(f"{100 * x:+.1f}%" for x in t["cost_per_rep"])
        print(f"  {t['mode']:<13} {t['case']}: {fmt_k(t['iops_with'])} vs {fmt_k(t['iops_without'])} IOPS, "
              f"cost {100 * t['cost']:+.1f}% (per rep: {reps})  {t['verdict']}")
    if fg:
        print()
        print(f"The flash path, goals within this boot (kernel {meta.get('kernel')}; cache file on {meta.get('flash')}):")
        print("\n".join(GOALS_HDR + goals_lines(fg, meta.get("kernel", "?"))))
    title = (f"ublk-http vs kernel loop, qemu TCG guest, {host.get('date')} (git {host.get('git')}), "
             f"{meta.get('reps')} reps x {meta.get('runtime_s')} s, fio CPU {meta.get('fio_cpu')} / server CPU {meta.get('server_cpu')}")
    if meta.get("suite") == "cache":
        glist = [(d, c, want) for _, ds, c, want, _ in FLASH_GOALS if want for d in ds]
    else:
        glist = GOALS
    devs = [d for d in devs if not any(x.get("refused") for x in devices if x.get("name") == d)]
    png = chart(a.dir, cases, devs, rows, title, glist)
    print()
    print(f"results: {res_path}" + (f", chart: {png}" if png else ""))
    runs = [r for r in runs if "refused" not in r]
    failed = sum(1 for r in runs if "error" in r)
    expected = meta.get("reps", 0) * len({(r["case"], r["device"]) for r in runs})
    if failed or not host.get("guest_finished", True) or (expected and len(runs) < expected):
        print(f"[bench] WARNING: {failed} failed run(s), {len(runs)} of {expected} results"
              + ("" if host.get("guest_finished", True) else ", the guest did not finish"), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
