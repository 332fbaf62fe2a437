"""QLoRA: the NF4 base weight is dequantised inside the GEMM; checked against bitsandbytes."""

import math

import pytest
import torch
from torch import nn

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from swkernels.nn import LoRALinear
from swkernels.ops.nf4_lora_linear import nf4_lora_linear_fwd, nf4_state

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

REL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def quantized(n, k, double_quant, dtype=torch.bfloat16, device="cpu"):
    w = torch.randn(n, k, dtype=dtype, device=device) / math.sqrt(k)
    p = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return p._quantize(device)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("n,k", [(37, 100), (53, 192), (64, 129)])  # odd out, in not a multiple of 64
def test_reference_dequantize_equals_bitsandbytes(double_quant, n, k):
    p = quantized(n, k, double_quant, dtype=torch.float32)
    packed, absmax, code, shape, blocksize = nf4_state(p)
    ours = reference.nf4_dequantize(packed, absmax, code, shape, blocksize)
    theirs = bnbf.dequantize_4bit(p.data, p.quant_state)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("n,k", [(37, 100), (53, 192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_forward_and_grads_match_bnb_dequantize_plus_matmul(double_quant, n, k, dtype, device):
    p = quantized(n, k, double_quant, dtype=torch.float32 if dtype == torch.float32 else dtype, device=device)
    w = bnbf.dequantize_4bit(p.data, p.quant_state).to(dtype)  # the peer's view of the weight
    r = 5
    x = torch.randn(3, 11, k, device=device).to(dtype).requires_grad_()
    a = (torch.randn(r, k, device=device) / math.sqrt(k)).requires_grad_()
    b = (torch.randn(n, r, device=device) / math.sqrt(r)).requires_grad_()
    bias = torch.randn(n, device=device).to(dtype).requires_grad_()
    y = swkernels.nf4_lora_linear(x, p, a, b, 3.0, bias)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b, bias), g)
    ref = reference.lora_linear(x.reshape(-1, k), w, a, b, 3.0, bias).reshape(y.shape)
    ref_grads = torch.autograd.grad(ref, (x, a, b, bias), g)
    assert rel_err(y, ref) < REL[dtype]
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) < REL[dtype]


def test_blocks_straddling_rows_dequantise_to_the_original_weight():
    """40×96: 60 whole blocks, but each row is 1.5 blocks. Our reader recovers the weight within
    NF4's rounding (bitsandbytes 0.50.2's native CPU dequantize does not for this shape)."""
    w = torch.randn(40, 96) / 10
    p = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=False,
                          quant_type="nf4")._quantize("cpu")
    packed, absmax, code, shape, bs = nf4_state(p)
    ours = reference.nf4_dequantize(packed, absmax, code, shape, bs)
    blockmax = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).reshape(40, 96)
    assert ((ours - w).abs() <= 0.17 * blockmax + 1e-6).all()  # half the widest NF4 code gap


def test_module_over_linear4bit_and_merge(device):
    base = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", device=device)
    base.weight = bnb.nn.Params4bit(torch.randn(40, 96, dtype=torch.bfloat16) / 10, requires_grad=False,
                                    blocksize=64, quant_type="nf4", module=base)._quantize(device)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.nf4
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(6, 96, dtype=torch.bfloat16, device=device)
    merged = x.float() @ layer.merged_weight().t() + base.bias.float()
    assert rel_err(layer(x), merged) < 2e-2


def test_repacked_or_unquantised_weights_are_refused():
    with pytest.raises(ValueError, match="quant_state"):
        swkernels.nf4_lora_linear(torch.randn(2, 8), nn.Parameter(torch.randn(4, 8)), torch.randn(2, 8),
                                  torch.randn(4, 2), 1.0)


def test_fake_impl_allocates_what_the_kernels_allocate():
    import gc

    from torch._subclasses.fake_tensor import FakeTensorMode

    p = quantized(40, 128, True)
    packed, absmax, code, (n, k), bs = nf4_state(p)

    def step():
        x = torch.randn(33, k, dtype=torch.bfloat16, requires_grad=True)
        a, b = torch.randn(4, k, requires_grad=True), torch.randn(n, 4, requires_grad=True)
        y, _ = nf4_lora_linear_fwd(x, packed, absmax, code, n, bs, a, b, None, 2.0, 0.0, 0)
        y.backward(torch.ones_like(y))
        gc.collect()

    with swkernels.force_backend("triton"), LiveBytes() as real:
        step()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        packed, absmax, code = (mode.from_tensor(t) for t in (packed, absmax, code))
    with mode, swkernels.force_backend("triton"), LiveBytes() as fake:
        step()
    assert fake.peak == real.peak > 0


def test_custom_op_registration_is_consistent():
    p = quantized(24, 64, False)
    packed, absmax, code, (n, k), bs = nf4_state(p)
    x = torch.randn(5, k, dtype=torch.bfloat16, requires_grad=True)
    a, b = torch.randn(3, k, requires_grad=True), torch.randn(n, 3, requires_grad=True)
    torch.library.opcheck(nf4_lora_linear_fwd, (x, packed, absmax, code, n, bs, a, b, None, 1.0, 0.0, 0))
