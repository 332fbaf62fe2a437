"""Loss kernels fused with the LM head vs torch's unfused linear + loss (and Liger when importable):
time and peak memory. GPU: BT = 1K…16K tokens, H = 4096, V = 32K / 128K / 152K.
On a CPU: interpreter smoke runs, and the fused torch path's memory and time at a small shape.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import swkernels
from bench.harness import BASELINE, ON_CUDA, OURS, interpreting, run

FULL = os.environ.get("SWBENCH_FULL") == "1"
H = 4096
GPU_CASES = [(bt, v) for bt in ([1024, 4096, 16384] if FULL else [4096]) for v in (32_000, 128_256, 151_936)]
CPU_CASES = [(512, 8192)]
SMOKE = [(8, 512)]

try:
    import liger_kernel.transformers  # noqa: F401

    HAVE_LIGER = True
except ImportError:
    HAVE_LIGER = False

CE = {"swkernels": OURS, "swkernels-torch": OURS, "torch-unfused": BASELINE, "liger": BASELINE}
KD = {"swkernels": OURS, "torch-unfused": BASELINE, "liger": BASELINE}


def _cases():
    return GPU_CASES if ON_CUDA else CPU_CASES + SMOKE


def _skip(provider, case):
    smoke = provider == "swkernels" and interpreting()
    if provider == "liger" and not (HAVE_LIGER and ON_CUDA):
        return "Liger-Kernel not importable (or no CUDA)"
    if ON_CUDA and provider == "swkernels-torch":
        return "the torch fallback is benchmarked on CPU"
    if smoke != (case in SMOKE):
        return "interpreter (smoke) runs take the smoke shape only, real runs never do"
    return None


def _tensors(bt, v, device, h=None):
    h = h or (H if ON_CUDA else 256)
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    hidden = torch.randn(bt, h, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, device=device, dtype=dtype) / h**0.5
    labels = torch.randint(0, v, (bt,), device=device)
    return hidden, weight, labels


@pytest.mark.parametrize("provider", CE)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"BT{c[0]}-V{c[1]}")
def test_fused_linear_cross_entropy(benchmark, case, provider, device):
    reason = _skip(provider, case)
    if reason:
        pytest.skip(reason)
    bt, v = case
    hidden, weight, labels = _tensors(bt, v, device)
    if provider == "torch-unfused":
        fn = lambda: torch.autograd.grad(F.cross_entropy((hidden @ weight.t()).float(), labels), hidden)
    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()
        fn = lambda: torch.autograd.grad(loss_fn(weight, hidden, labels), hidden)
    else:
        fn = lambda: torch.autograd.grad(swkernels.fused_linear_cross_entropy(hidden, weight, labels), hidden)
    with swkernels.force_backend("torch" if provider == "swkernels-torch" else None):
        run(benchmark, fn, op="linear+CE fwd+bwd", provider=provider, role=CE[provider], shape=f"BT{bt} V{v}",
            flops=4 * bt * v * hidden.shape[1], smoke=provider == "swkernels" and interpreting())


@pytest.mark.parametrize("provider", KD)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"BT{c[0]}-V{c[1]}")
def test_fused_linear_distill(benchmark, case, provider, device):
    reason = _skip(provider, case)
    if reason:
        pytest.skip(reason)
    bt, v = case
    hidden, weight, labels = _tensors(bt, v, device)
    t_hidden, t_weight, _ = _tensors(bt, v, device)
    t_hidden = t_hidden.detach()
    if provider == "torch-unfused":
        def fn():
            s = (hidden @ weight.t()).float()
            t = (t_hidden @ t_weight.t()).float()
            kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
            return torch.autograd.grad(0.5 * F.cross_entropy(s, labels) + 0.5 * kd, hidden)
    elif provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(jsd_beta=0.0)
        fn = lambda: torch.autograd.grad(loss_fn(hidden, weight, t_hidden, t_weight, labels), hidden)
    else:
        fn = lambda: torch.autograd.grad(swkernels.fused_linear_distill(hidden, weight, t_hidden, t_weight, labels),
                                         hidden)
    run(benchmark, fn, op="linear+KD fwd+bwd", provider=provider, role=KD[provider], shape=f"BT{bt} V{v}",
        flops=6 * bt * v * hidden.shape[1], smoke=provider == "swkernels" and interpreting())
