#!/usr/bin/env python3
"""bench/report_http.py -- the http suite's part of bench/report.py (moved
out of the heredocs of the former bench/http.sh): DIR/bench-console.log (the
@@META/@@RESULT lines of bench/guest-http.sh) and DIR/bench-hostmon.json ->
DIR/results.json, DIR/chart.png and the table and goals on stdout.
Standard library only; called as report_http.report(DIR, HOST) by report.py.
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys


def report(out_dir, host):
    """Renders the http report of out_dir; host: the host facts (date, label,
    load, disturbance).  Returns the exit status (0: every run produced a result)."""
    DISTURBED = 25.0   # % of a core used by other host processes during a run
    LINE = re.compile(r"@@(META|RESULT) (\{.*?\})@@")
    meta, runs, infos, errors, done = {}, [], [], [], False
    with open(os.path.join(out_dir, "bench-console.log"), errors="replace") as f:
        for line in f:
            done = done or "@@DONE@@" in line
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
    mon_path = os.path.join(out_dir, "bench-hostmon.json")
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
                    r["host_other_qemu"] = max((s[2] if len(s) > 2 else 0) for s in xs)
                    r["disturbed"] = r["host_other_cpu_pct"] > DISTURBED or r["host_other_qemu"] > 0

    CASES = [  # case, unit, baseline, devices (baseline last), nbdkit device
        ("cold-seq", "MiB/s", "curl", ["ublk-http", "nbdkit-curl", "curl-file", "store", "curl"], "nbdkit-curl"),
        ("cold-rand4k", "IOPS", "nbdkit-curl", ["ublk-http", "nbdkit-curl"], "nbdkit-curl"),
        ("warm-rand4k", "IOPS", "kloop", ["ublk-http", "nbdkit-cache", "kloop"], "nbdkit-cache"),
        ("warm-seq1m", "MiB/s", "kloop", ["ublk-http", "nbdkit-cache", "kloop"], "nbdkit-cache"),
        ("verity-cold-seq", "MiB/s", "ublk-http", ["ublk-http-verity", "ublk-http"], "-"),
        ("verity-warm-rand4k", "IOPS", "ublk-http", ["ublk-http-verity", "ublk-http"], "-"),
    ]
    # The wan case's links (10 and 50 ms unless BENCH_WAN_RTTS said otherwise), as the runs name them.
    WAN_RTTS = sorted({int(m.group(1)) for r in runs for m in [re.match(r"wan(\d+)-", r.get("case", ""))] if m})
    if any(r.get("case", "").startswith("mirror-") for r in runs):
        CASES.append(("mirror-slow", "ms", "fast", ["slow-first", "fast"], "-"))
        CASES.append(("mirror-stop", "ms", "both-up", ["stopped", "both-up"], "-"))
    for rtt in WAN_RTTS:
        CASES.append((f"wan{rtt}-rand4k", "IOPS", "bound", ["ublk-http-h2", "ublk-http-h1", "bound"], "-"))
        CASES.append((f"wan{rtt}-seq", "MiB/s", "curl", ["ublk-http-h2", "curl"], "-"))
    BASELINE_NOTE = {"curl": "curl download", "nbdkit-curl": "nbdkit-curl", "kloop": "kernel loop", "ublk-http": "unverified",
                     "bound": "QD/RTT bound", "fast": "the fast mirror alone", "both-up": "both mirrors up"}

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
                                                ("hits", "misses", "bytes_fetched", "requests", "retries", "errors",
                                                 "verify_failures", "pages_verified")
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
        g("verified cold sequential vs the same read unverified", ratio("verity-cold-seq", "ublk-http-verity"), 0.9, ">=", "median MiB/s ratio"),
        g("verified warm 4k random QD32 vs unverified (hits unchanged)", ratio("verity-warm-rand4k", "ublk-http-verity"), 0.95, ">=", "median IOPS ratio"),
        g(f"Range requests for a cold {reqcount['read_mib'] or 64} MiB sequential read",
          max(reqcount["values"]) if reqcount["values"] else None, reqcount["goal_max"] or 20, "<=", "worst rep"),
        g("server RSS after the cold sequential read, without its mapping of the cache file (VmRSS - CacheMapRss, KiB)",
          own_rss, rss_limit_kib, "<",
          f"64 MiB + the {bitmap_kib:g} KiB bitmap; worst rep; with the mapped cache file: VmRSS max "
          f"{max(x.get('VmRSS', 0) for x in rss_runs) if rss_runs else '-'} KiB, VmHWM max "
          f"{max(x.get('VmHWM', 0) for x in rss_runs) if rss_runs else '-'} KiB"),
    ]
    if ("mirror-slow", "slow-first") in summary:
        goals.append(g("p99 of cold 4k random reads, a slow mirror listed first, vs the fast mirror alone",
                       ratio("mirror-slow", "slow-first"), 2.0, "<=", "median p99 ratio"))
        st = summary.get(("mirror-stop", "stopped"), {})
        goals.append(g("the longest wait for one read with a mirror stopped mid-run (ms)", st.get("max"), 1000, "<", "worst rep"))
        errs = [r.get("fio_errors") for r in runs if r.get("case") == "mirror-stop" and r.get("device") == "stopped" and "error" not in r]
        goals.append(g("fio errors with a mirror stopped mid-run", max(errs) if errs else None, 0, "<=", "worst rep"))
    for rtt in WAN_RTTS:
        goals.append(g(f"cold 4k random QD32 over https (HTTP/2), {rtt} ms RTT, vs min(QD, in flight)/RTT",
                       ratio(f"wan{rtt}-rand4k", "ublk-http-h2"), 0.9, ">=", "median IOPS / bound"))
        goals.append(g(f"cold 1 MiB sequential over https (HTTP/2), {rtt} ms RTT, vs curl downloading the object",
                       ratio(f"wan{rtt}-seq", "ublk-http-h2"), 0.95, ">=", "median MiB/s ratio"))

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
            srv = "-" if d in ("kloop", "curl", "curl-file", "store", "bound") else f"{s['server_user_pct'] or 0:.0f}% / {s['server_sys_pct'] or 0:.0f}%"
            used = f"{s['runs']}/{s['runs_total']}" + (f" ({s['disturbed_runs']} disturbed)" if s["disturbed_runs"] else "")
            rows.append([c, d, f"{fmt(s['median'], unit)} {unit}",
                         f"{fmt(s['min'], unit)}–{fmt(s['max'], unit)} ({100 * (s['rel_spread'] or 0):.0f}%)",
                         r, rn, busy, srv, used])
    if reqcount["values"]:
        rows.append(["reqcount", "ublk-http", f"{statistics.median(reqcount['values']):g} requests",
                     f"{min(reqcount['values'])}–{max(reqcount['values'])}", f"goal <= {reqcount['goal_max']}", "", "", "", str(len(req))])
    # One image, many devices: bytes N devices at once fetched / one device alone.
    sh = [r for r in runs if r["case"] == "shared" and "error" not in r]
    shared = {"values": [r["value"] for r in sh], "devices": sh[0]["devices"] if sh else None,
              "bytes_one": [r["bytes_one"] for r in sh], "bytes_n": [r["bytes_n"] for r in sh],
              "time_one_s": [r["time_one_s"] for r in sh], "time_n_max_s": [r["time_n_max_s"] for r in sh]}
    if sh:
        v = shared["values"]
        rows.append(["shared", f"{shared['devices']} devices, one URL", f"{statistics.median(v):.2f}× bytes",
                     f"{min(v):.2f}–{max(v):.2f}", "vs one device alone", "", "", "", str(len(sh))])
    goals.append(g(f"bytes fetched by {shared['devices'] or 4} devices from one URL at once vs one device alone",
                   max(shared["values"]) if shared["values"] else None, 1.1, "<=", "worst rep"))
    # fleet: many overlays of one image on one host.
    fl = [r for r in runs if r["case"] == "fleet" and "error" not in r]
    fleet = {"runs": fl}
    if fl:
        worst = max(fl, key=lambda r: r["value"])
        rows.append(["fleet", f"{worst['devices']}/{worst['wanted']} overlays, {min(r['verified'] for r in fl)} verified",
                     f"{statistics.median([r['value'] for r in fl]) / 1024:.1f} MiB PSS each",
                     f"add {statistics.median([r['add_ms_median'] for r in fl]):.0f} ms median, {max(r['add_ms_max'] for r in fl)} max",
                     f"del -a {max(r['del_all_ms'] for r in fl) / 1000:.1f} s", "", "", "", str(len(fl))])
        goals.append(g("overlays added and verified (of the wanted)", min(r["verified"] for r in fl) / max(r["wanted"] for r in fl), 1.0, ">=", "worst rep"))
        goals.append(g("summed PSS per overlay server (MiB)", max(r["value"] for r in fl) / 1024, 5, "<=", "worst rep; the base's own PSS apart"))
        goals.append(g("add --overlay, median time (s)", max(r["add_ms_median"] for r in fl) / 1000, 0.5, "<=", "worst rep's median"))
        goals.append(g("del -a of every device (s)", max(r["del_all_ms"] for r in fl) / 1000, 5, "<=", "worst rep"))
    # boot: a boot-like read set, seconds from add to the reads' end and Range
    # requests, cold with and without a profile, relative to the warm cache.
    boot = {}
    for m in ("warm", "cold", "profile", "profile-wait"):
        rs = [r for r in runs if r["case"] == "boot" and r["device"] == f"ublk-http-{m}" and "error" not in r]
        if rs:
            boot[m] = {"seconds": statistics.median([r["value"] for r in rs]), "min": min(r["value"] for r in rs),
                       "max": max(r["value"] for r in rs), "requests": statistics.median([r["requests"] for r in rs]), "runs": len(rs),
                       "rtt_ms": rs[0].get("rtt_ms")}
    warm_s = boot.get("warm", {}).get("seconds")
    for m, b in boot.items():
        # The round trip netem gave nginx (runs before it had none).
        rows.append([f"boot, RTT {b['rtt_ms']} ms" if b["rtt_ms"] else "boot", f"ublk-http {m}", f"{b['seconds']:.2f} s, {b['requests']:g} requests",
                     f"{b['min']:.2f}–{b['max']:.2f} s", f"{b['seconds'] / warm_s:.2f}× warm" if warm_s else "-", "", "", "", str(b["runs"])])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(hdr)]
    def line(cols):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    table = [line(hdr), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]

    res = {"host": host, "meta": meta, "complete": done, "summary": list(summary.values()), "goals": goals,
           "reqcount": reqcount, "shared": shared, "boot": boot, "fleet": fleet, "rss_kb_cold_seq": rss_runs, "rss_limit_kib": rss_limit_kib,
           "info": infos, "setup_errors": errors, "runs": runs}
    json.dump(res, open(os.path.join(out_dir, "results.json"), "w"), indent=1)

    # ---- chart: medians relative to each case's baseline, min–max whiskers, goals -----------
    chart = os.path.join(out_dir, "chart.png")
    if shutil.which("gnuplot"):
        colors = {"ublk-http": "#1f77b4", "nbdkit-curl": "#ff7f0e", "nbdkit-cache": "#ff7f0e", "curl": "#7f7f7f", "curl-file": "#bbbbbb", "store": "#dddddd", "kloop": "#7f7f7f",
                  "ublk-http-verity": "#2ca02c", "ublk-http-h2": "#1f77b4", "ublk-http-h1": "#9467bd", "bound": "#7f7f7f",
                  "fast": "#7f7f7f", "slow-first": "#1f77b4", "both-up": "#7f7f7f", "stopped": "#1f77b4"}
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
                elif d == "ublk-http-verity":
                    goal_lines.append((x, 0.9 if c == "verity-cold-seq" else 0.95, "goal"))
            groups.append(((x0 + 1 + x) / 2, f"{c}\\nvs {BASELINE_NOTE[base]}"))
            x += 1
        with open(os.path.join(out_dir, "chart.dat"), "w") as f:
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
        gp.append(f'plot "{os.path.join(out_dir, "chart.dat")}" using 1:2:($1-0.4):($1+0.4):({ylo}):2:5 with boxxyerror lc rgb variable, '
                  '"" using 1:2:3:4 with yerrorbars lc rgb "black" pt 0 lw 1.5, '
                  '"" using 1:($4*1.1):6 with labels font ",9" offset 0,1')
        with open(os.path.join(out_dir, "chart.gp"), "w") as f:
            f.write("\n".join(gp) + "\n")
        r = subprocess.run(["gnuplot", os.path.join(out_dir, "chart.gp")], capture_output=True, text=True)
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
    nfail = sum(len(s["failed"]) for s in summary.values()) + sum(1 for r in runs if r["case"] in ("reqcount", "shared", "fleet") and "error" in r)
    print(f"\nresults: {os.path.join(out_dir, 'results.json')}, chart: {chart}" + ("" if done else "  (INCOMPLETE: no @@DONE)"))
    return 0 if done and nfail == 0 and not errors else 1
