"""QLoRA: the NF4 base weight is dequantised inside the GEMM; checked against bitsandbytes."""

import gc
import math

import pytest
import torch
from torch import nn

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from swkernels.ops.lora_linear import dropout_keep_scale
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


def fwd_args(p, x, a, b, bias=None, scaling=2.0, dropout_p=0.0, seed=0):
    """The custom op's arguments for weight p (what nf4_lora_linear passes)."""
    w = nf4_state(p)
    return (x, w.packed, w.absmax, w.code, w.absmax2, w.code2, w.offset, w.shape[0], w.blocksize,
            w.nested_blocksize, a, b, bias, scaling, dropout_p, seed)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("n,k", [(37, 100), (53, 192), (64, 129)])  # odd out, in not a multiple of 64
def test_reference_dequantize_equals_bitsandbytes(double_quant, n, k):
    p = quantized(n, k, double_quant, dtype=torch.float32)
    ours = nf4_state(p).dequantize()
    theirs = bnbf.dequantize_4bit(p.data, p.quant_state)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)


def test_nested_scales_decode_like_bitsandbytes():
    """Double quant: absmax = code2[q]·absmax2[b // 256] + offset, over more than 256 blocks."""
    p = quantized(70, 600, True, dtype=torch.float32)  # 657 blocks: three second-level blocks
    w, qs = nf4_state(p), p.quant_state
    assert w.nested and w.absmax.dtype == torch.uint8 and w.nested_blocksize == 256
    theirs = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    torch.testing.assert_close(w.absmax_fp32(), theirs, atol=0, rtol=0)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("n,k", [(37, 100), (53, 192), (40, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_forward_and_grads_match_dequantize_plus_matmul(double_quant, n, k, dtype, device):
    """The peer's view of W is bitsandbytes' dequantize_4bit, except for (40, 96) on the CPU,
    where bnb 0.50.2's native CPU kernel mis-indexes blocks straddling rows: there the oracle is
    bnb's own pure-torch implementation (its "default" backend)."""
    p = quantized(n, k, double_quant, dtype=torch.float32 if dtype == torch.float32 else dtype, device=device)
    w = bnb_dequantize(p).to(dtype)
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
    for name, got, want in zip(("dx", "dA", "dB", "dbias"), grads, ref_grads, strict=True):
        assert got.dtype == want.dtype, name
        assert rel_err(got, want) < REL[dtype], name


def bnb_dequantize(p):
    qs = p.quant_state
    if p.device.type == "cpu" and qs.shape[1] % qs.blocksize and qs.shape[1] % 2 == 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
        return _dequantize_4bit_compute(p.data.reshape(-1), absmax, qs.code, qs.blocksize, qs.shape, qs.dtype)
    return bnbf.dequantize_4bit(p.data, qs)


def test_blocks_straddling_rows_dequantise_to_the_original_weight():
    """40×96: 60 whole blocks, but each row is 1.5 blocks. Our reader recovers the weight within
    NF4's rounding (bitsandbytes 0.50.2's native CPU dequantize does not for this shape)."""
    w = torch.randn(40, 96) / 10
    p = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=False,
                          quant_type="nf4")._quantize("cpu")
    ours = nf4_state(p).dequantize()
    blockmax = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).reshape(40, 96)
    assert ((ours - w).abs() <= 0.17 * blockmax + 1e-6).all()  # half the widest NF4 code gap


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_dropout_gradients_use_the_forward_mask(double_quant, device):
    p, seed = quantized(29, 80, double_quant, device=device), 99
    w = nf4_state(p).dequantize().to(torch.bfloat16)
    x = torch.randn(21, 80, device=device, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(6, 80, device=device) / 9).requires_grad_()
    b = (torch.randn(29, 6, device=device) / 3).requires_grad_()
    y, _ = nf4_lora_linear_fwd(*fwd_args(p, x, a, b, None, 4.0, 0.25, seed))
    g = torch.randn_like(y)
    ref = reference.lora_linear(x, w, a, b, 4.0, keep_scale=dropout_keep_scale(21, 80, 0.25, seed, device))
    assert rel_err(y, ref) < REL[torch.bfloat16]
    for got, want in zip(torch.autograd.grad(y, (x, a, b), g), torch.autograd.grad(ref, (x, a, b), g), strict=True):
        assert rel_err(got, want) < REL[torch.bfloat16]


def test_repacked_or_unquantised_weights_are_refused():
    with pytest.raises(ValueError, match="quant_state"):
        swkernels.nf4_lora_linear(torch.randn(2, 8), nn.Parameter(torch.randn(4, 8)), torch.randn(2, 8),
                                  torch.randn(4, 2), 1.0)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_fake_impl_allocates_what_the_kernels_allocate(double_quant, device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        p = quantized(40, 128, double_quant, device=device)
        n, k = nf4_state(p).shape

        def step(weight_tensors):
            x = torch.randn(33, k, dtype=torch.bfloat16, requires_grad=True)
            a, b = torch.randn(4, k, requires_grad=True), torch.randn(n, 4, requires_grad=True)
            y, _ = nf4_lora_linear_fwd(x, *weight_tensors, n, 64, 256, a, b, None, 2.0, 0.0, 0)
            y.backward(torch.ones_like(y))
            gc.collect()

        w = nf4_state(p)
        weight_tensors = [w.packed, w.absmax, w.code, w.absmax2, w.code2, w.offset]
        with swkernels.force_backend("triton"), LiveBytes() as real:
            step(weight_tensors)
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:  # the weight exists before the step, as a model's does
            weight_tensors = [t if t is None else mode.from_tensor(t) for t in weight_tensors]
        with mode, swkernels.force_backend("triton"), LiveBytes() as fake:
            step(weight_tensors)
        assert fake.peak == real.peak > 0


def test_forward_allocates_only_the_output_and_s(device):
    """No dequantised copy of W (nor of its fp32 scales): the forward's new bytes are y and S."""
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        n, k, m, r = 256, 512, 8, 4
        p = quantized(n, k, True, device=device)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        a, b = torch.randn(r, k), torch.randn(n, r)
        with swkernels.force_backend("triton"), LiveBytes() as live:
            y, s = nf4_lora_linear_fwd(*fwd_args(p, x, a, b))
        assert live.peak == 512 * math.ceil(m * n * 2 / 512) + 512 * math.ceil(m * r * 2 / 512)
        assert live.peak < n * k // 4  # a bf16 W would be n·k·2 bytes


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_custom_op_registration_is_consistent(double_quant, device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        p = quantized(24, 64, double_quant, device=device)
        x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
        a, b = torch.randn(3, 64, requires_grad=True), torch.randn(24, 3, requires_grad=True)
        torch.library.opcheck(nf4_lora_linear_fwd, fwd_args(p, x, a, b, None, 1.0))


def test_torch_compile_traces_the_op():
    p = quantized(24, 64, True)
    a, b = torch.randn(3, 64), torch.randn(24, 3)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    fn = torch.compile(lambda x: swkernels.nf4_lora_linear(x, p, a, b, 2.0), backend="aot_eager", fullgraph=True)
    ref = reference.lora_linear(x, nf4_state(p).dequantize().to(torch.bfloat16), a, b, 2.0)
    assert rel_err(fn(x), ref) < REL[torch.bfloat16]
