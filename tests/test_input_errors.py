"""Bad input is one line and exit code 2, never a traceback (issue 13 item 8), and `merge --out`
never loses data (item 6). Most cases run in-process (the code path that raises UserError is the
one the CLI turns into `error: ...` + exit 2); a few run the real CLI to check that mapping."""

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch

from swengine.config import load_config
from swengine.errors import UserError
from swengine.model import load as model_load
from swengine.model.config import load_model_config
from swengine.planner.cli import make_plan
from swengine.planner.report import render, to_dict
from tests.utils import run_cli

ROOT = Path(__file__).parents[1]
PLAN_SCHEMA = json.loads((ROOT / "specs" / "plan.schema.json").read_text())


def one_line_exit_2(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ config values

@pytest.mark.parametrize("override,needle", [
    ("optim.lr=nan", "optim.lr must be a number"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0"),
    ("optim.lr=-inf", "optim.lr must be a finite number > 0"),
    ("optim.lr=0", "optim.lr must be a finite number > 0"),
    ("optim.lr=-1e-4", "optim.lr must be a finite number > 0"),
    ("seed=-1", "seed must be an integer from 0 to"),
    ("seed=99999999999999999999", "seed must be an integer from 0 to"),
    ("lora.alpha=nan", "lora.alpha must be a number"),
    ("lora.alpha=inf", "lora.alpha must be finite"),
    ("optim.betas=[0.9,", "optim.betas="),
    ("optim.betas=0.9,1.5", "optim.betas must be in [0, 1)"),
    ("optim.eps=-1", "optim.eps must be a finite number >= 0"),
    ("data.truncate=sometimes", "data.truncate='sometimes' is not valid"),
])
def test_bad_config_values_are_user_errors(override, needle):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("yaml_text,needle", [
    ("optim: {lr: .nan}\n", "optim.lr must be a number"),
    ("optim: {lr: null}\n", "optim.lr must be a number"),
    ("seed: null\n", "seed must be an integer"),
    ("data: {train: null}\n", "data.train must be a string"),
    ("lora: {targets: null}\n", "lora.targets must be a list"),
    ("context: {rope_scaling: null}\n", "context.rope_scaling must be a mapping"),
    ("model: null\n", "model must be a mapping"),
])
def test_null_and_nan_yaml_values_are_user_errors(tmp_path, yaml_text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(UserError, match=needle):
        load_config(str(f))


def test_non_utf8_yaml_is_a_user_error(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("output_dir: runs/caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_config(str(f))


def test_valid_values_still_load():
    cfg = load_config(None, ["optim.lr=1e-4", "seed=4294967295", "data.truncate=drop", "optim.betas=[0.9, 0.95]"])
    assert cfg.seed == 2**32 - 1 and cfg.data.truncate == "drop" and cfg.optim.betas == [0.9, 0.95]


# ------------------------------------------------------------------ model directories

@pytest.fixture()
def demo_copy(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(model_load.DEMO_MODEL, path)
    return path


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.pop("model_type"), "has no model_type"),
    (lambda c: c.update(model_type="zzz-net"), "unsupported architecture 'zzz-net'"),
    (lambda c: c.update(model_type="gpt2"), "unsupported architecture 'gpt2'"),
])
def test_model_config_without_or_with_unknown_model_type(demo_copy, edit, needle):
    _edit_config(demo_copy, edit)
    with pytest.raises(UserError, match=needle):
        model_load.load_config(str(demo_copy), 64, {})
    with pytest.raises(UserError, match=needle):
        load_model_config(str(demo_copy))  # the planner's reader


@pytest.mark.parametrize("content,needle", [
    (b"[1, 2, 3]", "holds a JSON list, not an object"),
    (b"{\"model_type\": \"llama\", \"x\": \"caf\xe9\"}", "is not UTF-8 text"),
    (b"{nope", "is not valid JSON"),
])
def test_model_config_json_that_is_not_an_object(demo_copy, content, needle):
    (demo_copy / "config.json").write_bytes(content)
    with pytest.raises(UserError, match=needle):
        model_load.load_config(str(demo_copy), 64, {})
    with pytest.raises(UserError, match=needle):
        load_model_config(str(demo_copy / "config.json"))


@pytest.mark.parametrize("rope,needle", [
    ({"rope_type": "bogus", "factor": 2.0}, "unknown rope_type 'bogus'"),
    ({"type": "warp", "factor": 2.0}, "unknown rope_type 'warp'"),
    ({"rope_type": "linear", "factor": "two"}, "factor must be a finite number > 0"),
    ({"rope_type": "linear", "factor": -2}, "factor must be a finite number > 0"),
])
def test_bad_rope_scaling_is_a_user_error(rope, needle):
    with pytest.raises(UserError, match=needle):
        model_load.load_config(str(model_load.DEMO_MODEL), 64, rope)


def test_good_rope_scaling_still_loads():
    config = model_load.load_config(str(model_load.DEMO_MODEL), 1024, {"rope_type": "linear", "factor": 2.0})
    assert config.max_position_embeddings == 1024


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights_are_a_user_error(demo_copy, keep):
    w = demo_copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:max(9, int(len(data) * keep))])
    config = model_load.load_config(str(demo_copy), 64, {})
    with pytest.raises(UserError, match="cannot load model weights from .*truncated or corrupt"):
        model_load.load_model(str(demo_copy), config, torch.float32, torch.device("cpu"))


# ------------------------------------------------------------------ plan

@pytest.mark.parametrize("kwargs,needle", [
    (dict(vram_gib=float("nan")), "--vram must be > 0"),
    (dict(vram_gib=float("inf")), "--vram must be > 0"),
    (dict(vram_gib=-5.0), "--vram must be > 0"),
    (dict(vram_gib=0.0), "--vram must be > 0"),
    (dict(gpu="rtx-4090", vram_gib=0.0), "--vram must be > 0"),
    (dict(gpu="rtx-4090", vram_gib=-5.0), "--vram must be > 0"),
    (dict(gpu="rtx-4090", vram_gib=float("nan")), "--vram must be > 0"),
    (dict(gpu="rtx-4090", vram_gib=1e300), "not a plausible GPU memory size"),
    (dict(gpu="rtx-4090", batch=0), "--batch must be >= 1"),
])
def test_plan_rejects_bad_vram(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        make_plan("llama-3.2-1b", **kwargs)


def test_plan_gpu_with_vram_uses_the_vram():
    plan = make_plan("llama-3.2-1b", gpu="rtx-4090", vram_gib=8.0, seq_len=1024)
    assert plan.vram_bytes == 8 * 2**30


def test_plan_config_json_holding_a_list(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(UserError, match="holds a JSON list"):
        make_plan(str(tmp_path), gpu="rtx-4090")


def test_plan_seq_len_beyond_max_positions_is_warned(tmp_path):
    cfg = load_model_config("qwen2.5-0.5b").to_dict()
    cfg["max_position_embeddings"] = 1024
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    long = make_plan(str(tmp_path), vram_gib=80.0, seq_len=4096)
    data = json.loads(json.dumps(to_dict(long)))
    jsonschema.validate(data, PLAN_SCHEMA)
    assert data["max_position_embeddings"] == 1024
    assert len(data["warnings"]) == 1 and "exceeds the model's max_position_embeddings=1024" in data["warnings"][0]
    assert "rope_scaling" in data["warnings"][0]
    table = render(long)
    assert "warning: --seq-len 4096 exceeds" in table and "rope_scaling" in table.split("warning:")[1].splitlines()[0]
    short = json.loads(json.dumps(to_dict(make_plan(str(tmp_path), vram_gib=80.0, seq_len=1024))))
    jsonschema.validate(short, PLAN_SCHEMA)
    assert short["warnings"] == [] and "warning:" not in render(make_plan(str(tmp_path), vram_gib=80.0, seq_len=512))


def test_plan_cli_negative_vram_json_is_a_json_error_exit_2():
    proc = run_cli("plan", "--model", "llama-3.2-1b", "--gpu", "rtx-4090", "--vram", "-5", "--json",
                   env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr == "", proc.stderr[-2000:]
    error = json.loads(proc.stdout)  # an error object, never a plan
    jsonschema.validate(error, json.loads((ROOT / "specs" / "error.schema.json").read_text()))
    assert error["error"].startswith("--vram must be > 0") and error["exit_code"] == 2


# ------------------------------------------------------------------ merge

@pytest.fixture()
def adapter_run(tmp_path, demo_copy):
    """A run directory holding a PEFT adapter (non-zero B) for a copy of the demo model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_copy)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(demo_copy)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    return run


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_merge_refuses_the_base_directory_even_with_overwrite(adapter_run, demo_copy):
    from swengine.train.merge import merge

    before = _tree(demo_copy)
    for out in (demo_copy, demo_copy / ".." / demo_copy.name, demo_copy.parent):
        for overwrite in (False, True):
            with pytest.raises(UserError, match="base model's directory"):
                merge(str(adapter_run), str(out), overwrite=overwrite)
    with pytest.raises(UserError, match="would overwrite the adapter"):
        merge(str(adapter_run), str(adapter_run), overwrite=True)
    assert _tree(demo_copy) == before


def test_merge_refuses_a_non_empty_out_unless_overwrite(tmp_path, adapter_run):
    from swengine.train.merge import merge

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        merge(str(adapter_run), str(out))
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        merge(str(adapter_run), str(tmp_path / "file"), overwrite=True)
    merge(str(adapter_run), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((adapter_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.randint(0, 400, (1, 9))
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter_run / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(merged.eval()(ids).logits, want.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    merge(str(adapter_run), str(out), overwrite=True)  # again: the adapter is applied once, not twice
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits,
                               want(ids).logits, atol=1e-4, rtol=1e-4)
    empty = tmp_path / "empty"
    empty.mkdir()
    merge(str(adapter_run), str(empty))  # an empty directory needs no --overwrite
    assert (empty / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_merge_failure_leaves_no_partial_model_and_the_old_out_intact(tmp_path, adapter_run, monkeypatch):
    from transformers import PreTrainedModel

    from swengine.train.merge import merge

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def half_write(self, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_write)
    with pytest.raises(UserError, match="cannot write the merged model .*No space left on device"):
        merge(str(adapter_run), str(out), overwrite=True)
    assert _tree(out) == {"keep.txt": b"old"}
    with pytest.raises(UserError):
        merge(str(adapter_run), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "model", "run"])


def test_merge_cli_into_the_base_directory_is_one_line_exit_2(adapter_run, demo_copy):
    proc = run_cli("merge", str(adapter_run), "--out", str(demo_copy), "--overwrite")
    one_line_exit_2(proc, "base model's directory")


# ------------------------------------------------------------------ train CLI (the real exit code)

def test_train_cli_non_utf8_data_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"text": "caf\xe9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    proc = run_cli("train", f"data.train={bad}", f"output_dir={tmp_path / 'out'}", "schedule.max_steps=1")
    one_line_exit_2(proc, f"{bad}:1 is not UTF-8 text")
