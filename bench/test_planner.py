"""VRAM planner: accuracy of the analytic model against the fake-tensor measuring harness over a
matrix of real model configs (and accelerate's `estimate-memory` rule on the same configs), and
the analytic model's speed against measuring.

SWBENCH_FULL=1 (set by bench/run.sh) runs the whole matrix; otherwise a small subset (CI).
"""

import os

import pytest
import torch

from bench.harness import BASELINE, OURS, run
from swengine.model.config import load_model_config
from swengine.planner.analytic import estimate
from swengine.planner.measure import measure_fake
from swengine.planner.setup import Setup

FULL = os.environ.get("SWBENCH_FULL") == "1"

# model × seq 512–8192 × rank × checkpointing × attention × batch × optimizer
MATRIX = [
    ("llama-3.1-8b", 512, 4, 8, False, "sdpa", "adamw"),
    ("llama-3.1-8b", 2048, 1, 16, True, "sdpa", "adamw"),
    ("llama-3.1-8b", 8192, 1, 64, True, "sdpa", "adamw8bit"),
    ("llama-3.2-1b", 1024, 8, 16, False, "sdpa", "adamw"),
    ("llama-3.2-1b", 4096, 2, 32, True, "sdpa", "adamw"),
    ("llama-3.2-1b", 8192, 1, 16, True, "eager", "adamw"),
    ("llama-3.2-3b", 1024, 1, 32, False, "eager", "adamw"),
    ("llama-3.2-3b", 2048, 2, 8, True, "sdpa", "adamw8bit"),
    ("llama-3.2-3b", 8192, 1, 128, True, "sdpa", "adamw"),
    ("llama-2-7b", 512, 8, 16, True, "sdpa", "adamw"),
    ("llama-2-7b", 4096, 1, 16, True, "sdpa", "adamw"),
    ("llama-2-7b", 2048, 1, 64, False, "sdpa", "adamw"),
    ("mistral-7b", 2048, 2, 16, True, "sdpa", "adamw"),
    ("mistral-7b", 8192, 1, 32, True, "sdpa", "adamw8bit"),
    ("mistral-7b", 1024, 1, 8, False, "eager", "adamw"),
    ("qwen2.5-0.5b", 512, 16, 16, False, "sdpa", "adamw"),
    ("qwen2.5-0.5b", 4096, 2, 64, True, "sdpa", "adamw"),
    ("qwen2.5-0.5b", 8192, 1, 8, True, "eager", "adamw"),
    ("qwen2.5-1.5b", 2048, 4, 16, True, "sdpa", "adamw"),
    ("qwen2.5-1.5b", 1024, 2, 32, False, "sdpa", "adamw8bit"),
    ("qwen2.5-7b", 2048, 1, 16, True, "sdpa", "adamw"),
    ("qwen2.5-7b", 8192, 1, 16, True, "sdpa", "adamw8bit"),
    ("qwen2.5-7b", 512, 2, 64, False, "sdpa", "adamw"),
    ("phi-3-mini", 512, 4, 8, True, "sdpa", "adamw8bit"),
    ("phi-3-mini", 2048, 1, 16, False, "sdpa", "adamw"),
    ("phi-3-mini", 4096, 2, 32, True, "eager", "adamw"),
    ("gemma-2-2b", 1024, 1, 16, True, "eager", "adamw"),
    ("gemma-2-2b", 4096, 1, 8, True, "eager", "adamw8bit"),
    ("gemma-2-2b", 512, 4, 64, False, "eager", "adamw"),
    ("llama-3.1-8b", 4096, 2, 16, True, "sdpa", "adamw"),
    ("qwen2.5-1.5b", 8192, 1, 16, True, "sdpa", "adamw"),
    ("phi-3-mini", 8192, 1, 16, True, "sdpa", "adamw"),
]
CASES = MATRIX if FULL else [MATRIX[3], MATRIX[15], MATRIX[23]]


def _setup(seq, batch, rank, ckpt, attention, optimizer):
    return Setup(seq_len=seq, micro_batch=batch, lora_rank=rank, checkpointing=ckpt, attention=attention,
                 optimizer=optimizer)


def accelerate_estimate(config) -> tuple[int, int]:
    """accelerate estimate-memory on the same config: (bf16 weights total, 'Training using Adam' bf16)."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    total_fp32, _ = calculate_maximum_sizes(model)
    return total_fp32 // 2, max(estimate_training_usage(total_fp32, "bfloat16").values())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-s{c[1]}-b{c[2]}-r{c[3]}-{'ckpt' if c[4] else 'nockpt'}-{c[5]}-{c[6]}")
def test_planner_accuracy(benchmark, case):
    config = load_model_config(case[0])
    setup = _setup(*case[1:])
    measured = measure_fake(config, setup)
    predicted = estimate(config, setup)
    err = 100 * (predicted.peak_allocated - measured.peak_bytes) / measured.peak_bytes
    weights_only, adam_full = accelerate_estimate(config)
    benchmark.extra_info.update(
        planner_case=f"{case[0]} s={case[1]} b={case[2]} r={case[3]} {'ckpt' if case[4] else 'no-ckpt'} {case[5]} {case[6]}",
        measured_bytes=measured.peak_bytes, analytic_bytes=predicted.peak_allocated, analytic_error_pct=err,
        accelerate_weights_error_pct=100 * (weights_only - measured.peak_bytes) / measured.peak_bytes,
        accelerate_adam_error_pct=100 * (adam_full - measured.peak_bytes) / measured.peak_bytes,
        measured_phase=measured.peak_phase, analytic_phase=predicted.peak_phase)
    benchmark.group = "planner accuracy"
    benchmark.pedantic(lambda: estimate(config, setup), rounds=3, iterations=1)
    assert abs(err) < 5.0


@pytest.mark.parametrize("provider", ["analytic", "fake-measure"])
def test_planner_speed(benchmark, provider):
    """The analytic model answers in milliseconds; measuring the same step takes seconds."""
    config = load_model_config("qwen2.5-0.5b")
    setup = Setup(seq_len=2048, micro_batch=2)
    estimate(config, setup)  # warm the inventory cache
    fn = (lambda: estimate(config, setup)) if provider == "analytic" else (lambda: measure_fake(config, setup))
    run(benchmark, fn, op="planner estimate", provider=provider, role=OURS if provider == "analytic" else BASELINE,
        shape="qwen2.5-0.5b s2048 b2", smoke=False)
