"""Fused LoRA linear (bf16 and NF4 base) vs PEFT's LoRA layer, bitsandbytes + PEFT, and the bare
base GEMM (the floor: LoRA overhead is measured against it). Forward and forward+backward.

GPU shapes: Llama-3-8B / Mistral-7B (4096→4096, 4096→14336, 14336→4096) and Llama-3.2-3B
(3072→8192) projections, 2K–16K tokens, ranks 16/64 (8 too with SWBENCH_FULL=1).
"""

import math
import os

import pytest
import torch
from torch import nn

import swkernels
import swkernels.nn
from bench.harness import BASELINE, ON_CUDA, OURS, interpreting, run

FULL = os.environ.get("SWBENCH_FULL") == "1"
GPU_PROJ = [(4096, 4096), (4096, 14336), (14336, 4096), (3072, 8192)]
GPU_TOKENS = [2048, 8192, 16384] if FULL else [2048, 8192]
GPU_RANKS = [8, 16, 64] if FULL else [16, 64]
CPU_CASES = [(512, 512, 1024, 16)]  # tokens, in, out, rank: the torch paths on a CPU
SMOKE_CASES = [(40, 64, 96, 8)]

if ON_CUDA:
    CASES = [(t, k, n, r) for (k, n) in GPU_PROJ for t in GPU_TOKENS for r in GPU_RANKS]
else:
    CASES = CPU_CASES + SMOKE_CASES

DENSE = {"swkernels": OURS, "swkernels-torch": OURS, "peft": BASELINE, "base-gemm": BASELINE}
NF4 = {"swkernels-nf4": OURS, "bnb+peft": BASELINE}


def _peft_module(k, n, r, dtype, device, quantized):
    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(k, n, bias=False, dtype=dtype, device=device)

        def forward(self, x):
            return self.proj(x)

    holder = Holder()
    if quantized:
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(holder.proj.weight.data, requires_grad=False, blocksize=64,
                                     quant_type="nf4", module=q)._quantize(device)
        holder.proj = q
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return model


def _case(provider, tokens, k, n, r, device, backward):
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=backward)
    g = torch.randn(tokens, n, device=device, dtype=dtype)
    if provider in ("peft", "bnb+peft"):
        model = _peft_module(k, n, r, dtype, device, quantized=provider == "bnb+peft")
        params = [p for p in model.parameters() if p.requires_grad]

        def f():
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=ON_CUDA):
                return model(x)
    elif provider == "base-gemm":
        w = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
        params = []

        def f():
            return x @ w.t()
    else:
        base = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        if provider == "swkernels-nf4":
            import bitsandbytes as bnb

            q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(base.weight.data, requires_grad=False, blocksize=64, quant_type="nf4",
                                         module=q)._quantize(device)
            base = q
        layer = swkernels.nn.LoRALinear.from_linear(base, r=r, lora_alpha=2 * r)
        nn.init.normal_(layer.lora_B.weight, std=0.02)
        params = [layer.lora_A.weight, layer.lora_B.weight]

        def f():
            return layer(x)
    if not backward:
        return f
    inputs = [x, *params]
    return lambda: torch.autograd.grad(f(), inputs, g)


def _flops(tokens, k, n, r, backward):
    fwd = 2 * tokens * n * k + 2 * tokens * r * (k + n)
    return fwd + (2 * tokens * n * k + 4 * tokens * r * (k + n) if backward else 0)


def _skip_reason(provider, case):
    smoke_case = case in SMOKE_CASES
    triton_provider = provider in ("swkernels", "swkernels-nf4")
    if ON_CUDA:
        return "the torch fallback is benchmarked on CPU" if provider == "swkernels-torch" else None
    if triton_provider:
        return None if smoke_case else "Triton on CPU runs the interpreter: smoke shape only"
    if smoke_case:
        return "smoke shapes are for interpreter runs"
    if provider in ("bnb+peft",):
        return "bitsandbytes' CPU 4-bit matmul is not the path we compare with"
    return None


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(DENSE) + list(NF4))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{c[1]}x{c[2]}-r{c[3]}")
def test_lora_linear(benchmark, case, provider, backward, device):
    reason = _skip_reason(provider, case)
    if reason:
        pytest.skip(reason)
    tokens, k, n, r = case
    role = {**DENSE, **NF4}[provider]
    smoke = provider in ("swkernels", "swkernels-nf4") and interpreting()
    op = ("qlora" if provider in NF4 else "lora") + (" fwd+bwd" if backward else " fwd")
    with swkernels.force_backend("torch" if provider == "swkernels-torch" else None):
        fn = _case(provider, tokens, k, n, r, device, backward)
        run(benchmark, fn, op=op, provider=provider, role=role, shape=f"T{tokens} {k}->{n} r{r}",
            flops=_flops(tokens, k, n, r, backward), smoke=smoke)
