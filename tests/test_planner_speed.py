"""The planner's speed model: the fit, the tables, and how the search ranks with it."""

import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import LlamaConfig

from swengine.hardware import GPU_PROFILES
from swengine.model.config import load_model_config
from swengine.planner import speed
from swengine.planner.cli import make_plan
from swengine.planner.report import to_dict
from swengine.planner.search import GiB, plan
from swengine.planner.setup import Setup
from tests.utils import run_main

SCHEMA = json.loads((Path(__file__).parents[1] / "specs" / "plan.schema.json").read_text())
SMALL = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2048)


CONFIGS = [SMALL, LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
                              num_key_value_heads=4, vocab_size=1024)]


def _features(rng: random.Random) -> dict[str, float]:
    """Random setups of two models (one model alone makes weight reads a multiple of layer passes)."""
    cfg, s = rng.choice(CONFIGS), Setup(seq_len=rng.choice([64, 128, 512]), micro_batch=rng.choice([1, 2, 4]),
                          lora_rank=rng.choice([8, 64]), quant=rng.choice(["none", "nf4-dq"]),
                          checkpointing=rng.choice([False, True]))
    return speed.features(cfg, s, rng.choice([1, 4]))


def test_fit_recovers_known_coefficients_and_drops_unused_features():
    rng = random.Random(0)
    truth = {"flops": 2e-12, "nf4": 3e-9, "calls": 1e-3, "batch": 4e-3}  # no optimizer cost
    rows = [_features(rng) for _ in range(30)]
    seconds = [sum(truth[k] * r[k] for k in truth) for r in rows]
    coef = speed.fit(rows, seconds)
    assert set(coef) == set(truth)
    for k, v in truth.items():
        assert coef[k] == pytest.approx(v, rel=1e-6)


def test_fit_never_returns_a_negative_coefficient():
    rng = random.Random(1)
    rows = [_features(rng) for _ in range(20)]
    # time that falls with the NF4 work: unconstrained least squares would give nf4 < 0
    seconds = [1e-11 * r["flops"] + 5e-3 * r["batch"] - 1e-10 * r["nf4"] + 1.0 for r in rows]
    coef = speed.fit(rows, seconds)
    assert coef and all(v > 0 for v in coef.values())


def test_features_count_recompute_and_dequantisation():
    base = Setup(seq_len=256, micro_batch=2, lora_rank=16, checkpointing=False)
    plain, ckpt = speed.features(SMALL, base), speed.features(SMALL, base.with_(checkpointing=True))
    nf4 = speed.features(SMALL, base.with_(quant="nf4-dq"))
    assert plain["nf4"] == 0 and nf4["nf4"] > 0
    assert ckpt["flops"] > 1.3 * plain["flops"] and ckpt["calls"] == 1.5 * plain["calls"]
    accum = speed.features(SMALL, base, grad_accumulation=4)
    assert accum["flops"] == 4 * plain["flops"] and accum["params"] == plain["params"]  # one optimizer step


def test_a_gpu_without_measurements_gets_generic_coefficients_and_says_so():
    model = speed.model_for(GPU_PROFILES["rtx-4090"], "swkernels", tables={})
    assert not model.measured and "no measured steps" in model.source
    assert model.coef["flops"] == pytest.approx(1 / (165.2e12 * speed.GENERIC_MFU))


def test_a_measured_table_is_scaled_to_another_gpu_of_its_architecture():
    tables = {"sm_89": {"swkernels": {"device": "NVIDIA GeForce RTX 4090", "date": "2026-12-02",
                                      "coef": {"flops": 1e-14, "nf4": 1e-11, "calls": 1e-4}, "samples": [{}] * 5}}}
    same = speed.model_for(GPU_PROFILES["rtx-4090"], "swkernels", tables)
    other = speed.model_for(GPU_PROFILES["rtx-4060"], "swkernels", tables)
    assert same.measured and other.measured and "RTX 4090" in other.source
    assert same.coef["flops"] == 1e-14
    assert other.coef["flops"] == pytest.approx(1e-14 * 165.2 / 30.3)
    assert other.coef["nf4"] == pytest.approx(1e-11 * 1008 / 272) and other.coef["calls"] == 1e-4
    assert not speed.model_for(GPU_PROFILES["rtx-3090"], "swkernels", tables).measured  # sm_86: none
    # a bare --vram (no known GPU) is planned with generic GPU figures, never with the CPU table
    assert not speed.model_for(None, "swkernels", {"cpu": tables["sm_89"]}).measured


def test_the_shipped_cpu_table_is_a_real_fit():
    entry = speed.load_tables()["cpu"]["swkernels"]
    assert len(entry["samples"]) >= 20 and entry["coef"]["flops"] > 0
    assert speed.cpu_model().coef == entry["coef"] and speed.cpu_model().measured
    refit = speed.fit([s["features"] for s in entry["samples"]], [s["seconds"] for s in entry["samples"]])
    assert refit == pytest.approx(entry["coef"], rel=1e-6)


def test_llama_3b_on_a_24gb_card_is_planned_in_bf16_with_ranked_alternatives():
    p = make_plan("llama-3.2-3b", gpu="rtx-4090", seq_len=2048)
    assert p.fits and p.setup.quant == "none"
    assert p.tokens_per_second and p.tokens_per_second > 0
    assert 1 <= len(p.alternatives) <= 3
    assert all(a.why_not and a.estimate.total_vram <= 0.95 * p.vram_bytes for a in p.alternatives)
    assert any(a.estimate.setup.quant != "none" for a in p.alternatives)
    jsonschema.validate(json.loads(json.dumps(to_dict(p))), SCHEMA)


def _speeds(measured: bool) -> speed.SpeedModel:
    """Launch overhead so large that the micro-batch decides, and free dequantisation."""
    return speed.SpeedModel({"flops": 1e-15, "calls": 1.0, "params": 1e-12}, "test", measured=measured)


def test_nf4_wins_only_when_measurements_say_it_is_faster():
    config = load_model_config("llama-3.2-3b")
    kwargs = dict(gpu="x", vram_bytes=12 * GiB, seq_len=2048, effective_batch=16, rank=16,
                  base=Setup(seq_len=2048, lora_impl="swkernels", loss="fused"))
    measured = plan(config, "m", speed=_speeds(True), **kwargs)
    generic = plan(config, "m", speed=_speeds(False), **kwargs)
    # NF4 frees room for a larger micro-batch, which this (measured) model rates faster
    assert measured.setup.quant != "none" and measured.setup.micro_batch > generic.setup.micro_batch
    assert any("measured speed model predicts" in r for r in measured.reasons)
    assert generic.setup.quant == "none"  # unmeasured: bf16 fits, so bf16
    assert any("only by unmeasured coefficients" in a.why_not for a in generic.alternatives)


def test_prefer_memory_takes_the_smallest_peak_at_the_same_rank():
    config = load_model_config("llama-3.2-1b")
    kwargs = dict(gpu="rtx-4090", vram_bytes=24 * GiB, seq_len=2048, effective_batch=16)
    fast = plan(config, "m", **kwargs)
    small = plan(config, "m", prefer="memory", **kwargs)
    assert small.setup.lora_rank == fast.setup.lora_rank
    assert small.estimate.total_vram < fast.estimate.total_vram
    assert small.setup.checkpointing and small.setup.micro_batch == 1
    assert all(a.estimate.total_vram >= small.estimate.total_vram for a in small.alternatives)
    assert all("GiB more" in a.why_not for a in small.alternatives)


def test_plan_cli_prefer_and_alternatives(capsys):
    code, out, _ = run_main(capsys, ["plan", "--model", "llama-3.2-1b", "--gpu", "rtx-3060", "--prefer", "memory",
                                     "--alternatives", "2", "--json"])
    assert code == 0
    data = json.loads(out)
    jsonschema.validate(data, SCHEMA)
    assert data["prefer"] == "memory" and len(data["alternatives"]) <= 2 and data["speed_source"]
    code, out, _ = run_main(capsys, ["plan", "--model", "llama-3.2-1b", "--gpu", "rtx-3060"])
    assert code == 0 and "alternatives (--prefer speed)" in out and "why not chosen" in out
    code, _, err = run_main(capsys, ["plan", "--model", "llama-3.2-1b", "--gpu", "rtx-3060", "--prefer", "fast"])
    assert code == 2 and "--prefer" in err and "Traceback" not in err


@pytest.mark.slow  # ~20 real training steps on CPU
def test_a_speed_model_fitted_on_cpu_steps_ranks_three_setups_as_measured():
    """Fit on measured CPU steps of random setups, then rank three held-out setups whose measured
    times differ clearly: the prediction's order must be the measurement's."""
    torch.set_num_threads(1)
    rng = random.Random(3)
    rows, seconds = [], []
    for _ in range(12):
        s = Setup(seq_len=rng.choice([32, 64, 128]), micro_batch=rng.choice([1, 2, 4]), lora_rank=8,
                  quant=rng.choice(["none", "nf4-dq"]), checkpointing=rng.choice([False, True]), loss="fused",
                  lora_impl="swkernels")
        accum = rng.choice([1, 2])
        rows.append(speed.features(SMALL, s, accum))
        seconds.append(speed.measure_step_seconds(SMALL, s, accum, steps=3))
    model = speed.SpeedModel(speed.fit(rows, seconds), "cpu test", measured=True)
    three = [  # tokens/s: many tokens per call >> one short row per call > that plus dequantisation
        (Setup(seq_len=128, micro_batch=4, lora_rank=8, checkpointing=False, lora_impl="swkernels", loss="fused"), 1),
        (Setup(seq_len=32, micro_batch=1, lora_rank=8, checkpointing=True, lora_impl="swkernels", loss="fused"), 2),
        (Setup(seq_len=32, micro_batch=1, lora_rank=8, checkpointing=True, quant="nf4-dq", lora_impl="swkernels",
               loss="fused"), 2),
    ]
    measured = [s.tokens * a / speed.measure_step_seconds(SMALL, s, a, steps=5) for s, a in three]
    predicted = [model.tokens_per_second(SMALL, s, a) for s, a in three]
    order = lambda xs: sorted(range(len(xs)), key=lambda i: -xs[i])
    assert order(predicted) == order(measured), (predicted, measured)


def test_an_uncalibrated_family_is_planned_with_generic_coefficients_and_says_so(tmp_path, capsys):
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, vocab_size=151936).save_pretrained(tmp_path)
    code, out, _ = run_main(capsys, ["plan", "--model", str(tmp_path), "--gpu", "rtx-4090", "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["fits"] and any("'qwen3' is not calibrated" in n for n in data["notes"])
