"""One full training step at real layer sizes: swengine's patched model (fused LoRA GEMMs, RoPE,
SwiGLU and RMSNorm kernels, fused linear + cross-entropy) vs the common stacks — transformers +
PEFT + SDPA with transformers' fp32-logits loss, and the same with Liger's kernels patched into
the model instance when ``liger_kernel`` is importable — same config, random weights, tokens,
AdamW, bf16 autocast and per-layer checkpointing.

A step = forward + backward + grad-norm clip + AdamW + zero_grad (the loop's own functions,
:mod:`swengine.train.step`); every model is built by :func:`swengine.model.build.build_training_model`.
GPU: Llama-3.2-1B (bf16 and NF4 bases) and a 4-layer stack of Llama-3.1-8B layers (bf16 and NF4;
the NF4 baseline is bitsandbytes' Linear4bit under PEFT): tokens/s and peak memory. Each kernel's
share of the step (torch.profiler, self time) goes into ``extra_info['top_ops']`` and is printed,
so the next bottleneck is visible. On a CPU: a 4-layer hidden-256 Llama on the torch fallbacks
of both sides, so the CI gate watches the loop's overhead.
"""

import pytest
import torch

from bench.harness import BASELINE, ON_CUDA, OURS, run

GPU_CASES = [("llama-3.2-1b", "none", 2048, 4), ("llama-3.2-1b", "nf4-dq", 2048, 4),
             ("llama-3.1-8b-x4", "none", 2048, 2), ("llama-3.1-8b-x4", "nf4-dq", 2048, 2)]
CPU_CASES = [("tiny-llama", "none", 256, 4)]


def _liger():
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return None
    return _apply_liger_kernel_to_instance


PROVIDERS = {"swengine": OURS, "peft+hf-loss": BASELINE, **({"peft+liger": BASELINE} if ON_CUDA and _liger() else {})}


def _config(name: str):
    if name == "tiny-llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048)
    from swengine.model.config import load_model_config

    if name.endswith("-x4"):  # a stack of 4 real-size layers (the whole 8B does not change the per-token cost)
        config = load_model_config(name[:-3])
        config.num_hidden_layers = 4
        return config
    return load_model_config(name)


def top_ops(step, n: int = 12) -> list[tuple[str, float]]:
    """(op name, share of the step's self time) for the heaviest ops of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_CUDA else [])
    with profile(activities=activities) as prof:
        step()
        if ON_CUDA:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if ON_CUDA else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr)) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    return [(k, t / total) for k, t in sorted(events, key=lambda kv: -kv[1])[:n]]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", GPU_CASES if ON_CUDA else CPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-b{c[3]}")
def test_train_step(benchmark, provider, case):
    import swkernels
    from swengine.model.build import build_training_model
    from swengine.model.patch import LoraSpec
    from swengine.train.optim import build_optimizer
    from swengine.train.step import forward_backward, optimizer_step

    name, quant, seq, batch = case
    config = _config(name)
    ours = provider == "swengine"
    device = "cuda" if ON_CUDA else "cpu"
    torch.manual_seed(0)
    built = build_training_model(config, LoraSpec(rank=16, alpha=32.0), dtype=torch.bfloat16 if ON_CUDA else torch.float32,
                                 device=device, quant=quant, impl="swkernels" if ours else "peft", checkpointing=True)
    if provider == "peft+liger":
        _liger()(built.model.get_base_model())
    optimizer = build_optimizer(built.params, "adamw")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    data = {"input_ids": ids, "labels": ids}
    autocast = torch.bfloat16 if ON_CUDA else None
    # a CPU runs the kernels' torch fallbacks (a step in the Triton interpreter measures nothing);
    # Liger's forward computes its own fused loss when handed labels, so it goes the unfused way
    backend = None if ON_CUDA else "torch"

    def step():
        with swkernels.force_backend(backend):
            forward_backward(built.model, data, autocast_dtype=autocast, fused_loss=ours)
            optimizer_step(optimizer, built.params, max_grad_norm=1.0)

    tokens = batch * seq
    benchmark.extra_info["tokens_per_call"] = tokens
    run(benchmark, step, op="train-step", provider=provider, role=PROVIDERS[provider],
        shape=f"{name} {quant} B{batch}xS{seq} r16 ckpt", smoke=False)
    benchmark.extra_info["tokens_per_second"] = tokens / benchmark.stats.stats.min
    shares = top_ops(step)
    benchmark.extra_info["top_ops"] = [[k, round(s, 4)] for k, s in shares]
    print(f"\n{provider} {name} {quant}: " + ", ".join(f"{k} {100 * s:.1f}%" for k, s in shares))
