"""SwiGLU activation: fused Triton kernel vs torch eager (silu then mul), fwd and fwd+bwd.

Shapes: tokens × intermediate size of Llama-3-8B (14336) and Llama-3.2-1B (8192).
"""

import pytest
import torch
import torch.nn.functional as F

import swkernels
from bench.harness import BASELINE, ON_CUDA, OURS, interpreting, run

GPU_SHAPES = [(4096, 14336), (16384, 14336), (8192, 8192)]
CPU_SHAPES = [(256, 2048)]  # what a CPU handles in a benchmark round
SMOKE_SHAPES = [(8, 64)]  # interpreter: proves the path only

PROVIDERS = {
    "swkernels-triton": OURS,
    "swkernels-torch": OURS,  # our pure-torch fallback (what CPU users run)
    "torch-eager": BASELINE,
}


def _shapes():
    return GPU_SHAPES if ON_CUDA else CPU_SHAPES + SMOKE_SHAPES


def _case(provider, shape, device, backward):
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    g = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    u = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    dh = torch.randn(shape, device=device, dtype=dtype)
    if provider == "torch-eager":
        f = lambda: F.silu(g) * u
    else:  # swkernels-triton / swkernels-torch: the backend context picks the path
        f = lambda: swkernels.silu_mul(g, u)
    if not backward:
        return f
    return lambda: torch.autograd.grad(f(), (g, u), dh)


def _backend(provider):
    return swkernels.force_backend("torch" if provider == "swkernels-torch" else None)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", _shapes(), ids=str)
def test_silu_mul(benchmark, provider, shape, backward, device):
    smoke = provider == "swkernels-triton" and interpreting()
    if smoke != (shape in SMOKE_SHAPES):
        pytest.skip("interpreter (smoke) runs take the smoke shape only, real runs never do")
    if ON_CUDA and provider == "swkernels-torch":
        pytest.skip("the torch fallback is benchmarked on CPU")
    n = shape[0] * shape[1]
    elem = 2 if ON_CUDA else 4
    moved = n * elem * (3 if not backward else 3 + 5)  # fwd: g,u→h; bwd: dh,g,u→dg,du
    with _backend(provider):
        fn = _case(provider, shape, device, backward)
        run(benchmark, fn, op=f"silu_mul {'fwd+bwd' if backward else 'fwd'}", provider=provider,
            role=PROVIDERS[provider], shape=f"{shape[0]}x{shape[1]}", bytes_moved=moved, smoke=smoke)
