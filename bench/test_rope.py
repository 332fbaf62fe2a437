"""RoPE on Q and K: our kernel (cos/sin computed in-kernel, one launch) vs transformers' eager path
(rotary module builds cos/sin, then apply_rotary_pos_emb) vs Liger's RoPE when importable.

GPU: T = 2K…32K, 32 query / 8 key-value heads, head_dim 128, bf16, llama3 scaling (every scaling
type costs the same in-kernel: only inv_freq differs).
"""

import os

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import swkernels
from bench.harness import BASELINE, ON_CUDA, OURS, interpreting, run

FULL = os.environ.get("SWBENCH_FULL") == "1"
GPU_T = [2048, 8192, 16384, 32768] if FULL else [2048, 8192, 32768]
CPU_T = [1024]
SMOKE_T = [16]
HQ, HKV, D = 32, 8, 128
CONFIG = LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, rope_theta=500000.0,
                     max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})

try:
    from liger_kernel.ops.rope import LigerRopeFunction  # noqa: F401

    HAVE_LIGER = True
except ImportError:
    HAVE_LIGER = False

PROVIDERS = {"swkernels": OURS, "swkernels-torch": OURS, "hf-eager": BASELINE, "liger": BASELINE}


def _case(provider, T, device, backward):
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    q = torch.randn(1, T, HQ, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward)
    k = torch.randn(1, T, HKV, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward)
    pos = torch.arange(T, device=device)[None]
    if provider == "hf-eager":
        rotary = LlamaRotaryEmbedding(CONFIG).to(device)

        def f():
            cos, sin = rotary(q, pos)
            return apply_rotary_pos_emb(q, k, cos, sin)
    elif provider == "liger":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        rotary = LlamaRotaryEmbedding(CONFIG).to(device)

        def f():
            cos, sin = rotary(q, pos)
            return liger_rotary_pos_emb(q, k, cos, sin)
    else:
        inv, factor = swkernels.rope_inv_freq(CONFIG, T, device=device)

        def f():
            return swkernels.apply_rope(q, k, pos, inv, factor)
    if not backward:
        return f
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    return lambda: torch.autograd.grad(f(), (q, k), (gq, gk))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("T", GPU_T if ON_CUDA else CPU_T + SMOKE_T)
def test_rope(benchmark, T, provider, backward, device):
    smoke = provider == "swkernels" and interpreting()
    if provider == "liger" and not (HAVE_LIGER and ON_CUDA):
        pytest.skip("Liger-Kernel not importable (or no CUDA)")
    if ON_CUDA and provider == "swkernels-torch":
        pytest.skip("the torch fallback is benchmarked on CPU")
    if smoke != (T in SMOKE_T):
        pytest.skip("interpreter (smoke) runs take the smoke shape only, real runs never do")
    elem = 2 if ON_CUDA else 4
    moved = 2 * (HQ + HKV) * T * D * elem * (2 if backward else 1)  # read + write q and k (again for bwd)
    with swkernels.force_backend("torch" if provider == "swkernels-torch" else None):
        fn = _case(provider, T, device, backward)
        run(benchmark, fn, op=f"rope {'fwd+bwd' if backward else 'fwd'}", provider=provider,
            role=PROVIDERS[provider], shape=f"T{T} {HQ}q/{HKV}kv d{D}", bytes_moved=moved, smoke=smoke)
