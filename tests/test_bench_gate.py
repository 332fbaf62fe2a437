"""The benchmark regression gate: ratio logic, the report table, and a real injected slowdown."""

import json
import os
import subprocess
import sys

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


def test_gate_fails_on_an_injected_slowdown(tmp_path):
    base, slow = tmp_path / "base.json", tmp_path / "slow.json"
    _bench(base, {})
    _bench(slow, {"SWBENCH_SLOWDOWN": "3"})  # "ours" runs three times per call
    stored = tmp_path / "stored.json"
    assert bench_report.main([str(base), "--write-baseline", str(stored)]) == 0
    assert json.loads(stored.read_text())["speedups"], "the subset must produce a ratio"
    assert bench_report.main([str(slow), "--check", str(stored)]) == 1


def test_report_renders_ratio_table(tmp_path, capsys):
    path = tmp_path / "r.json"
    _bench(path, {})
    assert bench_report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| silu_mul fwd @ 256x2048 | swkernels-torch | torch-eager |" in out
    assert "×" in out
