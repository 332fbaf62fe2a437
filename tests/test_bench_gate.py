"""The benchmark regression gate: ratio logic, the report table, and a real injected slowdown."""

import json
import os
import subprocess
import sys

import pytest

from tools import bench_report


def test_check_flags_only_regressions_beyond_tolerance():
    stored = {"a": 2.0, "b": 1.0, "c": 1.5}
    current = {"a": 1.7, "b": 0.5}  # a: 18% slower (ok at 25%), b: 2x slower, c: missing
    problems = bench_report.check(current, stored, 0.25)
    assert len(problems) == 2
    assert problems[0].startswith("regression: b") and problems[1].startswith("missing: c")
    assert bench_report.check({"a": 2.6}, {"a": 2.0}, 0.25) == []  # faster is fine


def _bench(json_path, env_extra):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **env_extra}  # the gate compares CPU ratios
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "bench/test_silu_mul.py", "-q", "-p", "no:cacheprovider",
           "-k", "fwd and not bwd and (swkernels-torch or torch-eager)", f"--benchmark-json={json_path}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_gate_fails_on_an_injected_slowdown(tmp_path):
    base, slow = tmp_path / "base.json", tmp_path / "slow.json"
    _bench(base, {})
    _bench(slow, {"SWBENCH_SLOWDOWN": "3"})  # "ours" runs three times per call
    stored = tmp_path / "stored.json"
    assert bench_report.main([str(base), "--write-baseline", str(stored)]) == 0
    assert json.loads(stored.read_text())["speedups"], "the subset must produce a ratio"
    assert bench_report.main([str(slow), "--check", str(stored)]) == 1


@pytest.mark.slow
def test_report_renders_ratio_table(tmp_path, capsys):
    path = tmp_path / "r.json"
    _bench(path, {})
    assert bench_report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| silu_mul fwd @ 256x2048 | swkernels-torch | torch-eager |" in out
    assert "×" in out


def test_paired_timing_measures_the_ratio_and_the_report_prefers_it():
    import time

    from bench import harness

    group = "probe @ sleep"
    assert harness.paired_ratios(group, "base", harness.BASELINE, lambda: time.sleep(0.006)) == {}
    paired = harness.paired_ratios(group, "ours", harness.OURS, lambda: time.sleep(0.002))
    assert list(paired) == ["ours vs base"] and 2.0 < paired["ours vs base"] < 3.5
    entries = [bench_report.Entry(group, "ours", "ours", 1.0, None, False, {"paired": paired}),
               bench_report.Entry(group, "base", "baseline", 1.0, None, False, {})]
    assert bench_report.ratios(entries) == {f"{group} :: ours vs base": paired["ours vs base"]}


def test_huge_speedups_are_gated_at_the_cap():
    assert bench_report.check({"planner": 20_000.0}, {"planner": 75_000.0}, 0.25) == []
    assert bench_report.check({"planner": 50.0}, {"planner": 75_000.0}, 0.25)[0].startswith("regression: planner")


def test_a_measured_noise_allowance_widens_one_ratio_only():
    stored, wide = {"ce": 0.75, "rope": 1.0}, {"ce": 0.9}
    assert bench_report.check({"ce": 0.45, "rope": 0.9}, stored, 0.25, wide) == []
    assert bench_report.check({"ce": 0.38, "rope": 0.9}, stored, 0.25, wide)[0].startswith("regression: ce")
    assert bench_report.check({"ce": 0.45, "rope": 0.7}, stored, 0.25, wide)[0].startswith("regression: rope")
