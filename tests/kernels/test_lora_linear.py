"""Fused LoRA linear: forward and every gradient vs the fp32 reference and vs PEFT's LoRA layer."""

import math

import pytest
import torch
from torch import nn

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from swkernels.ops.lora_linear import dropout_keep_scale, lora_linear_fwd
from tests.utils import DTYPES

# relative Frobenius error allowed per compute dtype (GEMM outputs summed over K terms)
REL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (leading dims, in, out, rank, bias): odd sizes, not multiples of any tile; ranks 1 to 256
# (above 32 the epilogue loops over rank chunks)
SHAPES = [((5,), 16, 24, 1, False), ((3, 41), 67, 89, 8, True), ((2, 7), 130, 33, 70, True),
          ((2, 5), 40, 24, 256, True)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def make(lead, k, n, r, bias, dtype, device):
    x = torch.randn(*lead, k, device=device).to(dtype).requires_grad_()
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    a = (torch.randn(r, k, device=device) / math.sqrt(k)).requires_grad_()
    b = (torch.randn(n, r, device=device) / math.sqrt(r)).requires_grad_()
    bb = torch.randn(n, device=device).to(dtype).requires_grad_() if bias else None
    return x, w, a, b, bb


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_and_grads_match_reference(shape, dtype, device):
    lead, k, n, r, has_bias = shape
    x, w, a, b, bias = make(lead, k, n, r, has_bias, dtype, device)
    scaling = 16 / r
    y = swkernels.lora_linear(x, w, a, b, scaling, bias)
    assert y.shape == (*lead, n) and y.dtype == dtype
    g = torch.randn_like(y)
    inputs = [x, a, b] + ([bias] if has_bias else [])
    grads = torch.autograd.grad(y, inputs, g)
    ref = reference.lora_linear(x.reshape(-1, k), w, a, b, scaling, bias).reshape(y.shape)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    assert rel_err(y, ref) < REL[dtype]
    for name, got, want in zip(["dx", "dA", "dB", "dbias"], grads, ref_grads, strict=False):
        assert got.dtype == want.dtype, name
        assert rel_err(got, want) < REL[dtype], name
    assert a.dtype == torch.float32 and grads[1].dtype == torch.float32  # fp32 adapter grads


@pytest.mark.slow  # 15 s in the interpreter; the odd shapes of the main matrix stay in the quick run
def test_large_odd_shape_in_bf16(device):
    """(3, 41, 401) → 1271: many tiles in every direction, none full (bf16, the training dtype)."""
    x, w, a, b, bias = make((3, 41), 401, 1271, 16, True, torch.bfloat16, device)
    y = swkernels.lora_linear(x, w, a, b, 2.0, bias)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b, bias), g)
    ref = reference.lora_linear(x.reshape(-1, 401), w, a, b, 2.0, bias).reshape(y.shape)
    ref_grads = torch.autograd.grad(ref, (x, a, b, bias), g)
    assert rel_err(y, ref) < REL[torch.bfloat16]
    for name, got, want in zip(["dx", "dA", "dB", "dbias"], grads, ref_grads, strict=True):
        assert rel_err(got, want) < REL[torch.bfloat16], name


def _peft_layer(k, n, r, alpha, rslora, bias, a, b, w, bb):
    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(k, n, bias=bias)

        def forward(self, x):
            return self.proj(x)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(w.float())
        if bias:
            holder.proj.bias.copy_(bb.float())
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=rslora))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return model, layer


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_peft_lora_layer(rslora, dtype, device):
    k, n, r, alpha = 45, 53, 6, 12.0
    x, w, a, b, bias = make((4, 9), k, n, r, True, dtype, device)
    model, peft_layer = _peft_layer(k, n, r, alpha, rslora, True, a.detach(), b.detach(), w, bias.detach())
    model.to(device)
    # PEFT in fp32 is the ground truth; ours runs in the test dtype
    x32 = x.detach().float().requires_grad_()
    y_peft = model(x32)
    g = torch.randn_like(y_peft)
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    dx_p, da_p, db_p = torch.autograd.grad(y_peft, (x32, pa, pb), g)

    scaling = alpha / (math.sqrt(r) if rslora else r)
    assert scaling == pytest.approx(peft_layer.scaling["default"])
    y = swkernels.lora_linear(x, w, a, b, scaling, bias)
    dx, da, db = torch.autograd.grad(y, (x, a, b), g.to(dtype))
    for got, want in ((y, y_peft), (dx, dx_p), (da, da_p), (db, db_p)):
        assert rel_err(got, want) < max(REL[dtype], 5e-3 if dtype != torch.float32 else 0)


def test_dropout_mask_statistics_and_gradients(device):
    p, seed = 0.3, 1234
    keep = dropout_keep_scale(200, 300, p, seed, device)
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    dropped = (keep == 0).float().mean().item()
    assert abs(dropped - p) < 4 * sigma  # keep-rate 1 − p
    assert torch.allclose(keep[keep > 0], torch.full_like(keep[keep > 0], 1 / (1 - p)))  # scale 1/(1−p)
    # unbiased (E[mask/(1−p)] = 1, so E[drop(x)·Aᵀ] = x·Aᵀ); neighbours along rows and columns independent
    assert abs(keep.mean().item() - 1) < 4 * sigma / (1 - p)
    kept = (keep > 0).float() - (1 - p)
    for pair in ((kept[:, 1:], kept[:, :-1]), (kept[1:], kept[:-1])):
        assert abs((pair[0] * pair[1]).mean().item()) < 4 * p * (1 - p) / math.sqrt(kept.numel())
    assert not torch.equal(keep, dropout_keep_scale(200, 300, p, seed + 1, device))

    x, w, a, b, bias = make((37,), 45, 29, 5, True, torch.float32, device)
    y, _ = lora_linear_fwd(x, w, a, b, bias, 2.0, p, seed)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b, bias), g)
    ks = dropout_keep_scale(37, 45, p, seed, device)
    ref = reference.lora_linear(x, w, a, b, 2.0, bias, keep_scale=ks)
    ref_grads = torch.autograd.grad(ref, (x, a, b, bias), g)
    assert rel_err(y, ref) < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) < 1e-5


def test_dropout_is_reproducible_from_torch_seed(device):
    x, w, a, b, _ = make((8,), 32, 16, 4, False, torch.float32, device)
    torch.manual_seed(7)
    y1 = swkernels.lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    torch.manual_seed(7)
    y2 = swkernels.lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y2)


def test_bad_shapes_say_how_to_fix():
    x, w, a, b, _ = make((3,), 16, 8, 2, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="PEFT's lora_A layout"):
        swkernels.lora_linear(x, w, a.t(), b, 1.0)
    with pytest.raises(ValueError, match="PEFT's lora_B layout"):
        swkernels.lora_linear(x, w, a, b.t(), 1.0)
    with pytest.raises(ValueError, match="features"):
        swkernels.lora_linear(x[:, :5], w, a, b, 1.0)


def test_custom_op_registration_is_consistent(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        x, w, a, b, bias = make((6,), 20, 12, 3, True, torch.float32, device)
        torch.library.opcheck(lora_linear_fwd, (x, w, a, b, bias, 2.0, 0.0, 0))


def test_fake_impl_allocates_what_the_kernels_allocate(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        import gc

        from torch._subclasses.fake_tensor import FakeTensorMode

        def step():
            x, w, a, b, bias = make((50,), 40, 30, 4, True, torch.bfloat16, device)
            y = swkernels.lora_linear(x, w, a, b, 2.0, bias)
            y.backward(torch.ones_like(y))
            gc.collect()

        with swkernels.force_backend("triton"), LiveBytes() as real:
            step()
        with FakeTensorMode(), swkernels.force_backend("triton"), LiveBytes() as fake:
            step()
        assert fake.peak == real.peak > 0


def test_torch_compile_traces_the_op():
    x, w, a, b, bias = make((4,), 16, 8, 2, True, torch.float32, "cpu")
    fn = torch.compile(lambda x: swkernels.lora_linear(x, w, a, b, 2.0, bias), backend="aot_eager", fullgraph=True)
    assert rel_err(fn(x), reference.lora_linear(x, w, a, b, 2.0, bias)) < 1e-5


def test_the_torch_fallback_runs_inside_cpu_autocast():
    """The fallback computes in fp32 even under autocast (which used to break its in-place fp32
    addmm with a bf16 output): the CPU NF4 path of the planner's real-CPU measurement runs there."""
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    w, a, b = torch.randn(40, 24, dtype=torch.bfloat16), torch.randn(4, 24), torch.randn(40, 4)
    plain = reference.lora_linear(x, w, a, b, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reference.lora_linear(x, w, a, b, 0.5)
    assert inside.dtype == torch.bfloat16
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
