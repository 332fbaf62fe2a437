"""One full training step at real model sizes: swengine's patched model (fused LoRA kernels,
fused linear + cross-entropy) vs the common stack (PEFT LoRA, transformers' fp32-logits loss),
same random weights' config, same tokens, same AdamW, bf16 autocast, per-layer checkpointing.

A step = forward + backward + grad-norm clip + AdamW + zero_grad (the loop's own functions,
:mod:`swengine.train.step`). GPU shapes: Llama-3.2-1B (bf16 base) and Llama-3.1-8B (NF4 base,
QLoRA; the baseline is bitsandbytes' Linear4bit under PEFT). On a CPU: a 4-layer hidden-256
Llama, torch paths on both sides (the kernels' fallbacks), so CI watches the loop's overhead.
"""

import pytest
import torch

from bench.harness import BASELINE, ON_CUDA, OURS, run

GPU_CASES = [("llama-3.2-1b", "none", 2048, 4), ("llama-3.1-8b", "nf4-dq", 2048, 2)]
CPU_CASES = [("tiny-llama", "none", 256, 4)]
PROVIDERS = {"swengine": OURS, "peft+hf-loss": BASELINE}


def _config(name: str):
    if name == "tiny-llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048)
    from swengine.model.config import load_model_config

    return load_model_config(name)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", GPU_CASES if ON_CUDA else CPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-b{c[3]}")
def test_train_step(benchmark, provider, case):
    import swkernels
    from swengine.planner.measure import build_training_model
    from swengine.planner.setup import Setup
    from swengine.train.optim import build_optimizer
    from swengine.train.step import forward_backward, optimizer_step

    name, quant, seq, batch = case
    config = _config(name)
    ours = provider == "swengine"
    setup = Setup(seq_len=seq, micro_batch=batch, lora_rank=16, quant=quant, checkpointing=True,
                  lora_impl="swkernels" if ours else "peft", loss="fused" if ours else "unfused")
    device = "cuda" if ON_CUDA else "cpu"
    torch.manual_seed(0)
    model = build_training_model(config, setup, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    data = {"input_ids": ids, "labels": ids}
    autocast = torch.bfloat16 if ON_CUDA else None

    # a CPU runs the kernels' torch fallbacks (a step in the Triton interpreter measures nothing)
    backend = None if ON_CUDA else "torch"

    def step():
        with swkernels.force_backend(backend):
            forward_backward(model, data, autocast_dtype=autocast, fused_loss=setup.loss == "fused")
            optimizer_step(optimizer, params, max_grad_norm=1.0)

    tokens = batch * seq
    benchmark.extra_info["tokens_per_call"] = tokens
    run(benchmark, step, op="train-step", provider=provider, role=PROVIDERS[provider],
        shape=f"{name} {quant} B{batch}xS{seq} r16 ckpt", smoke=False)
    benchmark.extra_info["tokens_per_second"] = tokens / benchmark.stats.stats.min
