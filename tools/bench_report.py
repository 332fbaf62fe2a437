#!/usr/bin/env python
"""Render a bench results file (pytest-benchmark JSON + swengine metadata) as a markdown table
of ours/baseline ratios, and gate regressions against a stored baseline of ratios.

    python tools/bench_report.py RESULTS.json                          # markdown table
    python tools/bench_report.py R1.json [R2.json ...] --write-baseline FILE   # median ratio per key
    python tools/bench_report.py R1.json [R2.json ...] --check FILE [--tolerance 0.25]
                                       # best ratio per key across the runs; exit 1 on regression

Ratios, not absolute times: "speedup" = baseline time / ours time, both measured in the same
run, so a slower or busier machine moves both sides. Smoke (interpreter) results are listed
but never compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass


@dataclass
class Entry:
    group: str
    provider: str
    role: str
    seconds: float  # CUDA: median of CUDA-event timings; CPU: minimum round
    peak_mem: int | None
    smoke: bool
    info: dict


def load(path: str) -> tuple[list[Entry], dict]:
    with open(path) as f:
        data = json.load(f)
    meta = dict(data.get("swengine", {}))
    meta["_raw"] = [b.get("extra_info", {}) for b in data["benchmarks"] if "analytic_error_pct" in b.get("extra_info", {})]
    entries = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "role" not in info:
            continue
        secs = info["ms_median"] / 1e3 if "ms_median" in info else b["stats"]["min"]
        entries.append(Entry(b["group"], info["provider"], info["role"], secs, info.get("peak_mem_bytes"),
                             bool(info.get("smoke")), info))
    return entries, meta


def ratios(entries: list[Entry]) -> dict[str, float]:
    """{'group :: ours-provider vs baseline-provider': baseline_seconds / ours_seconds}; where the
    harness timed the pair interleaved (CPU runs), the median of those per-pair ratios instead."""
    out = {}
    real = [e for e in entries if not e.smoke]
    for ours in (e for e in real if e.role == "ours"):
        for base in (e for e in real if e.role == "baseline" and e.group == ours.group):
            out[f"{ours.group} :: {ours.provider} vs {base.provider}"] = base.seconds / ours.seconds
    for e in real:
        for pair, ratio in e.info.get("paired", {}).items():
            out[f"{e.group} :: {pair}"] = ratio
    return out


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"


def _fmt_mem(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def markdown(entries: list[Entry], meta: dict) -> str:
    where = meta.get("gpu") or f"CPU ({meta.get('host', '?')}, {meta.get('cpu_threads', '?')} threads)"
    lines = [f"### {where} · {meta.get('date', '')} · commit {str(meta.get('commit'))[:10]}", "",
             "| benchmark | ours | baseline | ours time | baseline time | speedup | ours peak mem | baseline peak mem | ours throughput |",
             "|---|---|---|---|---|---|---|---|---|"]
    real = [e for e in entries if not e.smoke]
    for ours in (e for e in real if e.role == "ours"):
        bases = [e for e in real if e.role == "baseline" and e.group == ours.group]
        thr = []
        if "gbps" in ours.info:
            thr.append(f"{ours.info['gbps']:.0f} GB/s" + (f" ({ours.info['pct_of_peak_bw']:.0f}% peak)"
                                                           if "pct_of_peak_bw" in ours.info else ""))
        if "tflops" in ours.info:
            thr.append(f"{ours.info['tflops']:.1f} TFLOP/s" + (f" ({ours.info['pct_of_peak_tflops']:.0f}% peak)"
                                                               if "pct_of_peak_tflops" in ours.info else ""))
        for base in bases or [None]:
            lines.append(
                f"| {ours.group} | {ours.provider} | {base.provider if base else '(none: not a result)'} | "
                f"{_fmt_time(ours.seconds)} | {_fmt_time(base.seconds) if base else '-'} | "
                f"{f'{base.seconds / ours.seconds:.2f}×' if base else '-'} | {_fmt_mem(ours.peak_mem)} | "
                f"{_fmt_mem(base.peak_mem) if base else '-'} | {', '.join(thr) or '-'} |")
    lines += planner_accuracy(entries_raw=meta.get("_raw", []))
    smoke = sorted({f"{e.group} ({e.provider})" for e in entries if e.smoke})
    if smoke:
        lines += ["", f"Smoke runs (Triton interpreter, not timed for comparison): {', '.join(smoke)}"]
    return "\n".join(lines)


def planner_accuracy(entries_raw: list[dict]) -> list[str]:
    """The planner's analytic peak vs the measured one, with accelerate's estimate beside it."""
    if not entries_raw:
        return []
    lines = ["", "#### VRAM planner accuracy (analytic vs measured peak; accelerate estimate-memory on the same configs)", "",
             "| config | measured | analytic | error | accelerate weights-only | accelerate 'training with Adam' |",
             "|---|---|---|---|---|---|"]
    for r in entries_raw:
        lines.append(f"| {r['planner_case']} | {r['measured_bytes'] / 2**30:.2f} GiB | {r['analytic_bytes'] / 2**30:.2f} GiB | "
                     f"{r['analytic_error_pct']:+.2f}% | {r['accelerate_weights_error_pct']:+.1f}% | "
                     f"{r['accelerate_adam_error_pct']:+.1f}% |")
    errs = [abs(r["analytic_error_pct"]) for r in entries_raw]
    acc = [abs(r["accelerate_weights_error_pct"]) for r in entries_raw]
    lines.append(f"\n{len(errs)} configs: analytic mean |error| {statistics.mean(errs):.2f}%, max {max(errs):.2f}%; "
                 f"accelerate (weights only) mean |error| {statistics.mean(acc):.1f}%")
    return lines


# A speedup of thousands (the planner's analytic answer vs its fake-tensor run) has a sub-millisecond
# side whose timing is noise; such ratios are gated at this value, which still catches a real loss.
GATE_CAP = 100.0


def check(current: dict[str, float], baseline: dict[str, float], tolerance: float,
          tolerances: dict[str, float] | None = None) -> list[str]:
    """Regressions: a speedup that fell by more than ``tolerance`` (0.25 = 25%) below the stored one
    (stored speedups above GATE_CAP count as GATE_CAP). ``tolerances`` widens it per ratio for
    benchmarks whose spread on an unchanged tree was measured to exceed it (kept in the baseline
    file with that measurement)."""
    problems = []
    for key, stored in sorted(baseline.items()):
        allowed = max(tolerance, (tolerances or {}).get(key, 0.0))
        if key not in current:
            problems.append(f"missing: {key} (stored speedup {stored:.2f}×) was not measured")
        elif current[key] < min(stored, GATE_CAP) / (1 + allowed):
            problems.append(f"regression: {key}: speedup {current[key]:.2f}× vs stored {stored:.2f}× "
                            f"({100 * (stored / current[key] - 1):.0f}% slower relative to the baseline)")
    return problems


def combine(runs: list[dict[str, float]], how) -> dict[str, float]:
    keys = {k for r in runs for k in r}
    return {k: how([r[k] for r in runs if k in r]) for k in sorted(keys)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results JSON file(s) of repeated runs")
    ap.add_argument("--check", metavar="BASELINE", help="stored ratios (JSON) to gate against")
    ap.add_argument("--tolerance", type=float, default=0.25, help="allowed relative slowdown (default 0.25)")
    ap.add_argument("--write-baseline", metavar="FILE", help="write this run's ratios as the new baseline")
    args = ap.parse_args(argv)
    loaded = [load(path) for path in args.results]
    entries, meta = loaded[-1]
    print(markdown(entries, meta))
    runs = [ratios(e) for e, _ in loaded]
    if args.write_baseline:
        typical = combine(runs, statistics.median)
        kept = {}
        if os.path.exists(args.write_baseline):  # measured noise allowances survive a refresh
            with open(args.write_baseline) as f:
                old = json.load(f)
            kept = {k: old[k] for k in ("tolerances", "tolerances_measured") if k in old}
        with open(args.write_baseline, "w") as f:
            json.dump({"source": meta, "runs": len(runs), "speedups": typical, **kept}, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"\nwrote {len(typical)} ratios (median of {len(runs)} runs) to {args.write_baseline}")
    if args.check:
        with open(args.check) as f:
            baseline = json.load(f)
        stored = baseline["speedups"]
        problems = check(combine(runs, max), stored, args.tolerance, baseline.get("tolerances"))
        print()
        if problems:
            print("\n".join(problems))
            print(f"bench gate: FAIL ({len(problems)} of {len(stored)} ratios)")
            return 1
        print(f"bench gate: ok ({len(stored)} ratios within {args.tolerance:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
