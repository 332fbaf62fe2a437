import json
from pathlib import Path

import jsonschema
import pytest

from tests.utils import run_cli

SCHEMA = json.loads((Path(__file__).parents[1] / "specs" / "doctor.schema.json").read_text())


def test_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("doctor", "plan", "train", "merge", "eval", "distill-cache", "rollback", "report"):
        assert f"  {command} " in proc.stdout, command


def test_doctor_human_report():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "triton" in proc.stdout and "bitsandbytes" in proc.stdout
    assert "CUDA:" in proc.stdout and "GPUs" in proc.stdout


def test_doctor_json_validates_against_the_spec():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    jsonschema.validate(report, SCHEMA)
    assert report["packages"]["torch"].startswith("2.")
    if not report["nvml"]["available"]:
        assert report["gpus"] == [] and report["nvml"]["error"]


@pytest.mark.slow
def test_doctor_kernels_json_validates_and_passes():
    env = {"TRITON_INTERPRET": "0"}
    proc = run_cli("doctor", "--json", "--kernels", "--arch", "89", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    jsonschema.validate(report, SCHEMA)
    health = report["kernel_health"]
    assert health["ok"] and {r["arch"] for r in health["results"]} == {89}


def test_bad_backend_env_is_one_line_exit_2():
    proc = run_cli("doctor", env={"SWKERNELS_BACKEND": "cuda"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "SWKERNELS_BACKEND" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_command_exits_2():
    proc = run_cli("fly")
    assert proc.returncode == 2
