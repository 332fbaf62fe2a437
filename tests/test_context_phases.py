"""Context extension in phases (issue 16): a tiny Llama with a 64-token window trained to 256
tokens with YaRN ×4 in two phases (128 → 256), on CPU, in-process."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import swkernels
from swengine.cli import main
from swengine.model.load import DEMO_MODEL, load_tokenizer
from swengine.telemetry import read_events
from swengine.train import checkpoint as ckpt
from tests.utils import run_main

ROOT = Path(__file__).parents[1]
STEPS = 3  # per phase


def schema(name: str) -> dict:
    return json.loads((ROOT / "specs" / f"{name}.schema.json").read_text())


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A tiny random Llama whose native window is 64 tokens."""
    tok = load_tokenizer(str(DEMO_MODEL))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, vocab_size=len(tok),
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("short") / "llama-64"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def args(model, data, out, *extra):
    return ["train", f"model.path={model}", f"data.train={data}", f"output_dir={out}", f"context.phase_steps={STEPS}",
            "logging.every=1", "logging.eval_every=0", "checkpointing.save_every=2", "schedule.micro_batch_size=2",
            "lora.rank=4", "optim.lr=3e-3", "--context", "256", "--rope-scaling", "yarn", *extra]


def run(capsys, argv):
    return run_main(capsys, argv)


@pytest.fixture(scope="module")
def phased_run(short_model, tiny_train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("phased") / "run"
    with swkernels.force_backend("torch"), pytest.raises(SystemExit) as exit_:
        main(args(short_model, tiny_train_data, out))
    assert exit_.value.code == 0
    return out


def test_two_phases_write_named_checkpoints_and_telemetry(phased_run):
    for i, length in ((1, 128), (2, 256)):
        report = json.loads((phased_run / "phases" / f"phase-{i}" / "eval.json").read_text())
        assert report["seq_len"] == length and report["step"] == i * STEPS
        assert set(report["ppl"]) == {str(x) for x in (128, 256)[:i]}
        assert all(v is not None and v > 1 for v in report["ppl"].values())
        assert (phased_run / "phases" / f"phase-{i}" / "adapter_model.safetensors").is_file()
    events = [json.loads(line) for line in (phased_run / "metrics.jsonl").read_text().splitlines()]
    for event in events:
        jsonschema.validate(event, schema("telemetry"))
    ends = [e for e in events if e["event"] == "phase_end"]
    assert [e["phase"] for e in ends] == ["phase-1", "phase-2"] and ends[0]["regression"] is None
    assert ends[1]["regression"] is not None and isinstance(ends[1]["flagged"], bool)
    train = [e for e in events if e["event"] == "train"]
    assert [e["phase"] for e in train] == ["phase-1"] * STEPS + ["phase-2"] * STEPS
    boundary = [c for c in ckpt.list_checkpoints(phased_run) if ckpt.read_state(c).get("kind") == "phase"]
    assert [ckpt.read_state(c)["completed_phase"] for c in boundary] == ["phase-1"]  # kept from pruning
    assert ckpt.read_state(boundary[0])["phase"] == "phase-2"


def test_each_phase_trains_at_its_length(phased_run):
    start = next(json.loads(x) for x in (phased_run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["event"] == "run_start")
    assert start["config"]["context"]["phases"] == [128, 256]
    assert start["config"]["context"]["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    tokens = [e["tokens"] for e in read_events(phased_run / "metrics.jsonl", "train")]
    assert max(tokens[:STEPS]) <= 2 * 128 < max(tokens[STEPS:]) <= 2 * 256  # micro-batch 2, one row each


def reload_matches_ours(run_dir: Path, short_model: Path, rope_type: str) -> None:
    """transformers + PEFT, loading the base with the config saved next to the adapter, give the
    logits of our patched model built from the run's rope parameters; without it they differ."""
    from peft import PeftModel

    from swengine.model.adapter import load_adapter_into, read_adapter_config, spec_from_config
    from swengine.model.patch import patch

    adapter = run_dir / "adapter"
    config = AutoConfig.from_pretrained(adapter)  # the extended config saved with the adapter
    assert config.rope_parameters["rope_type"] == rope_type
    assert config.max_position_embeddings == (64 if rope_type == "dynamic" else 256)  # dynamic scales past it
    ids = torch.randint(0, 400, (1, 256))
    base = AutoModelForCausalLM.from_pretrained(short_model, config=config, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    ours = AutoModelForCausalLM.from_pretrained(short_model, config=config, dtype=torch.float32).eval()
    handle = patch(ours, spec_from_config(read_adapter_config(adapter)))
    load_adapter_into(handle, adapter)
    with swkernels.force_backend("torch"):
        torch.testing.assert_close(ours(ids).logits, theirs, atol=1e-4, rtol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(short_model, dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain, str(adapter)).eval()(ids).logits
    assert not torch.allclose(plain, theirs, atol=1e-3)  # without the saved config the logits differ


def test_transformers_reloads_the_extended_model_with_our_logits(phased_run, short_model):
    assert AutoConfig.from_pretrained(phased_run / "adapter").rope_parameters["factor"] == 4.0
    reload_matches_ours(phased_run, short_model, "yarn")


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "llama3", "longrope"])
def test_every_rope_scaling_type_trains_in_phases_and_reloads(rope_type, short_model, tiny_train_data, tmp_path,
                                                              capsys):
    argv = args(short_model, tiny_train_data, tmp_path / "run", "context.phase_steps=1")
    argv[argv.index("yarn")] = rope_type
    code, _, err = run(capsys, argv)
    assert code == 0, err
    reload_matches_ours(tmp_path / "run", short_model, rope_type)


def test_merge_keeps_the_rope_parameters(phased_run, capsys, tmp_path):
    code, _, err = run(capsys, ["merge", str(phased_run), "--out", str(tmp_path / "merged")])
    assert code == 0, err
    merged = AutoConfig.from_pretrained(tmp_path / "merged")
    assert merged.rope_parameters["rope_type"] == "yarn" and merged.rope_parameters["factor"] == 4.0


def test_eval_json_validates_at_every_phase_length(phased_run, capsys):
    code, out, err = run(capsys, ["eval", str(phased_run), "--lengths", "128,256", "--passkey-trials", "1",
                                  "--passkey-depths", "0.5", "--json"])
    assert code == 0, err
    report = json.loads(out)
    jsonschema.validate(report, schema("eval"))
    assert "yarn" in json.dumps(report)


def test_resume_inside_a_phase_reproduces_the_uninterrupted_run(phased_run, short_model, tiny_train_data, tmp_path,
                                                               capsys, monkeypatch):
    import swengine.train.trainer as trainer

    real, calls = trainer.forward_backward, [0]

    def interrupt_in_step_5(*a, **k):
        calls[0] += 1
        if calls[0] == 5:  # micro-batch 1 of step 5: inside phase 2
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "forward_backward", interrupt_in_step_5)
    code, _, err = run(capsys, args(short_model, tiny_train_data, out))
    assert code == 130, err
    state = ckpt.read_state(ckpt.list_checkpoints(out)[-1])
    assert state["step"] == 4 and state["phase"] == "phase-2"
    monkeypatch.setattr(trainer, "forward_backward", real)
    code, _, err = run(capsys, args(short_model, tiny_train_data, out, "--resume", "auto"))
    assert code == 0, err
    losses = {e["step"]: e["loss"] for e in read_events(out / "metrics.jsonl", "train")}
    expected = {e["step"]: e["loss"] for e in read_events(phased_run / "metrics.jsonl", "train")}
    assert losses == expected


@pytest.mark.parametrize("extra,needle", [
    (["--context", "32"], "is not beyond the model's 64 positions"),
    (["context.phases=[128, 96]"], "context.phases must increase"),
    (["context.phases=[128, 256]", "context.rope_scaling={\"rope_type\": \"warp\", \"factor\": 4}"],
     "unknown rope_type 'warp'"),
    (["context.phases=[128, 256]", "context.phase_steps=[1, 2, 3]"], "context.phase_steps has 3 values for 2"),
    (["--rope-scaling", "yarn"], "--rope-scaling needs --context"),
    (["context.phases=[128, 256]", "context.rope_scaling={\"rope_type\": \"llama3\", \"factor\": 4}"],
     "rope_type 'llama3' needs 'low_freq_factor'"),
])
def test_bad_context_input_is_one_line_exit_2(short_model, tiny_train_data, tmp_path, capsys, extra, needle):
    argv = ["train", f"model.path={short_model}", f"data.train={tiny_train_data}", f"output_dir={tmp_path}", *extra]
    code, out, err = run(capsys, argv)
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_a_model_without_rope_is_refused(tmp_path, tiny_train_data, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    code, _, err = run(capsys, ["train", f"model.path={tmp_path / 'gpt2'}", f"data.train={tiny_train_data}",
                                f"output_dir={tmp_path / 'run'}", "context.phases=[128, 256]",
                                "context.rope_scaling={\"rope_type\": \"yarn\", \"factor\": 4}"])
    assert code == 2 and "no rotary position embeddings" in err, err


def test_auto_plans_each_phase_and_the_user_values_win(short_model, capsys):
    code, out, err = run(capsys, ["train", f"model.path={short_model}", "--context", "256", "--auto", "--gpu",
                                  "rtx-4060", "--dry-run", "schedule.grad_accumulation=3"])
    assert code == 0, err
    assert "128-token phase" in err and "256-token phase" in err and "accumulation 3" in err
    assert "keeping your schedule.grad_accumulation=3" in err or "grad_accumulation: 3" in out
