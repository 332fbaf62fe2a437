"""The CLI's conventions (issue 15): --version, -h everywhere, completion, exit codes 0/1/2/3/130,
stdout for results and stderr for progress, JSON errors under --json, schema_version in every
JSON output. In-process through ``swengine.cli.main`` (the console entry point) where possible."""

import json
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from swengine import SCHEMA_VERSION
from swengine.cli import EXIT_CODES
from tests.utils import run_main

ROOT = Path(__file__).parents[1]


def schema(name: str) -> dict:
    return json.loads((ROOT / "specs" / f"{name}.schema.json").read_text())


def run(capsys, *argv: str) -> tuple[int, str, str]:
    return run_main(capsys, argv)


def test_version_and_short_help_everywhere(capsys):
    from swengine import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"swengine {__version__}"
    code, out, _ = run(capsys, "-h")
    assert code == 0 and "--install-completion" in out
    for exit_code in EXIT_CODES:  # documented in the root help
        assert f"{exit_code} " in out
    for command in ("doctor", "plan", "train", "merge", "eval", "distill-cache", "rollback", "report"):
        code, out, _ = run(capsys, command, "-h")
        assert code == 0 and f"Usage: swengine {command}" in out, command


def test_switches_are_shown_as_switches(capsys):
    _, out, _ = run(capsys, "plan", "-h")
    assert "<bool>" not in out and "--qlora / --no-qlora" in out


def test_readme_documents_the_exit_codes():
    readme = (ROOT / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} " in readme, f"README's exit-code table lacks {code}"


def test_exit_1_when_the_plan_does_not_fit_with_a_schema_valid_json(capsys):
    code, out, err = run(capsys, "plan", "-m", "llama-3.1-8b", "--vram", "2", "--json")
    plan = json.loads(out)
    assert code == 1 and plan["fits"] is False and plan["schema_version"] == SCHEMA_VERSION
    jsonschema.validate(plan, schema("plan"))


@pytest.mark.parametrize("argv,needle", [
    (["plan", "-m", "llama-3.2-1b", "--vram", "8", "--lora-impl", "foo"], "--lora-impl"),  # the flag, not lora_impl
    (["plan", "-m", "llama-3.2-1b", "--vram", "8", "--teacher-quant", "nf4"], "--teacher-quant nf4 needs --teacher"),
    (["plan", "-m", "llama-3.2-1b", "--vram", "0"], "--vram must be > 0"),
    (["plan", "--vram", "8"], "--model"),
    (["merge", "run", "--out", "x", "--dtype", "int8"], "--dtype"),
    (["nosuchcommand"], "No such command"),
])
def test_exit_2_names_the_flag_the_user_typed(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err and out == ""
    if argv[0] == "merge":
        return  # merge has no --json
    code, out, err = run(capsys, *argv, "--json")
    error = json.loads(out)
    jsonschema.validate(error, schema("error"))
    assert code == 2 and needle in error["error"] + str(error["hint"]) and err == ""


def test_json_error_carries_the_hint_separately(capsys):
    code, out, _ = run(capsys, "plan", "-m", "llama-3.2-1b", "--gpu", "nope", "--json")
    error = json.loads(out)
    assert code == 2 and error["error"].startswith("unknown GPU 'nope'")


def test_doctor_json_validates(capsys):
    code, out, _ = run(capsys, "doctor", "--json")
    report = json.loads(out)
    assert code == 0 and report["schema_version"] == SCHEMA_VERSION
    jsonschema.validate(report, schema("doctor"))


def test_dry_run_stdout_is_pure_yaml_even_with_auto(capsys):
    code, out, err = run(capsys, "train", "--auto", "--gpu", "rtx-4090", "--dry-run")
    cfg = yaml.safe_load(out)
    assert code == 0 and isinstance(cfg, dict) and cfg["lora"]["rank"] >= 1
    assert "total VRAM" in err and "total VRAM" not in out  # the plan table is a notice


def tiny(tiny_llama, tiny_train_data, out, *extra):
    return ["train", f"model.path={tiny_llama}", f"data.train={tiny_train_data}", f"output_dir={out}",
            "data.max_seq_len=64", "schedule.micro_batch_size=2", "logging.every=1", "logging.eval_every=0", *extra]


def test_training_progress_goes_to_stderr_and_the_summary_to_stdout(capsys, tiny_llama, tiny_train_data, tmp_path):
    code, out, err = run(capsys, *tiny(tiny_llama, tiny_train_data, tmp_path / "run", "schedule.max_steps=2"))
    assert code == 0
    assert "step 1/2" in err and "trainable LoRA parameters" in err and "% padding" in err
    assert "step 1/2" not in out and "adapter (PEFT format)" in out
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        assert event["schema_version"] == SCHEMA_VERSION
        jsonschema.validate(event, schema("telemetry"))


def test_exit_3_on_a_non_finite_loss(capsys, tiny_llama, tiny_train_data, tmp_path, monkeypatch):
    import swengine.train.trainer as trainer

    real = trainer.forward_backward
    monkeypatch.setattr(trainer, "forward_backward", lambda *a, **k: real(*a, **k) * float("nan"))
    code, out, err = run(capsys, *tiny(tiny_llama, tiny_train_data, tmp_path / "run", "schedule.max_steps=3"))
    assert code == 3 and "error: loss is nan at step 1: stopped" in err and "Traceback" not in err


def test_exit_3_on_out_of_memory_with_what_to_change(capsys, tiny_llama, tiny_train_data, tmp_path, monkeypatch):
    import swengine.train.trainer as trainer

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "forward_backward", oom)
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, *tiny(tiny_llama, tiny_train_data, out_dir, "schedule.max_steps=3"))
    assert code == 3 and "out of GPU memory at step 1" in err and "micro_batch_size" in err
    assert err.strip().count("\n") == 0 or "Traceback" not in err
    end = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "run_end" and end["status"] == "failed" and end["reason"] == "out_of_memory"


def test_exit_130_on_ctrl_c_outside_training(capsys, monkeypatch):
    import swengine.planner.cli as planner_cli

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(planner_cli, "make_plan", interrupted)
    code, _, _ = run(capsys, "plan", "-m", "llama-3.2-1b", "--vram", "8")
    assert code == 130


def test_the_package_imports_without_posix_only_modules():
    """Windows has neither `resource` nor `fcntl`: both are imported where used, with a fallback."""
    import subprocess

    code = ("import sys; sys.modules['resource'] = None; sys.modules['fcntl'] = None\n"
            "import torch, swengine.cli, swengine.train.trainer as t, swengine.train.lock\n"
            "assert t.peak_memory_bytes(torch.device('cpu')) == 0\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_declared_dependencies_cover_every_third_party_import():
    import ast

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
             for d in declared["dependencies"] + sum(declared["optional-dependencies"].values(), [])}
    module_of = {"pyyaml": "yaml", "nvidia-ml-py": "pynvml", "flash-attn": "flash_attn"}
    provided = {module_of.get(n, n.replace("-", "_")) for n in names}
    imported = set()
    for path in [*(ROOT / "swengine").rglob("*.py"), *(ROOT / "swkernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("swengine", "swkernels")}
    assert third_party <= provided, f"imported but not declared in pyproject.toml: {third_party - provided}"
    runtime = {d.split(">")[0].split("=")[0].strip() for d in declared["dependencies"]}
    assert "jsonschema" not in runtime  # only the tests validate schemas


def test_auto_keeps_what_the_user_set_and_refuses_a_kept_setup_that_cannot_fit(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--auto", "--gpu", "rtx-4060", "--dry-run", "lora.rank=8",
                         "optim.name=adamw8bit")
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["lora"]["rank"] == 8 and cfg["optim"]["name"] == "adamw8bit"
    assert "--auto planned around what you set:" in err and "optim.name=adamw8bit" in err
    # the search plans around them: the plan printed is the setup that runs
    assert "optimizer adamw8bit (as you set)" in err and "LoRA rank 8 (as requested)" in err
    minimal = tmp_path / "min.yaml"  # the demo model and data; rank, alpha, batch... left to the planner
    minimal.write_text(f"output_dir: {tmp_path / 'run'}\n")
    code, out, err = run(capsys, "train", str(minimal), "--auto", "--gpu", "rtx-4060", "--dry-run",
                         "schedule.micro_batch_size=2", "checkpointing.gradient_checkpointing=true")
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["schedule"]["micro_batch_size"] == 2 and cfg["checkpointing"]["gradient_checkpointing"]
    assert "micro-batch 2 (as you set)" in err and "gradient checkpointing on (as you set)" in err
    changed = err.split("--auto changed (keys you did not set):")[1].split("--auto planned around")[0]
    assert "lora.rank" in changed and "->" in changed and "schedule.micro_batch_size" not in changed
    code, out, err = run(capsys, "train", str(minimal), "--auto", "--prefer", "memory", "--gpu", "rtx-4060",
                         "--dry-run")
    small = yaml.safe_load(out)
    assert code == 0 and small["checkpointing"]["gradient_checkpointing"] and "--prefer memory" in err
    code, _, err = run(capsys, "train", "--prefer", "memory", "--dry-run")
    assert code == 2 and "--prefer only applies with --auto" in err
    code, out, err = run(capsys, "train", "--auto", "--gpu", "rtx-4060", "--dry-run", "schedule.micro_batch_size=512",
                         "data.max_seq_len=512", "checkpointing.gradient_checkpointing=false")
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --auto: the setup you set (micro_batch=512") and "needs at least" in last
    assert "the closest setup that fits:" in last
