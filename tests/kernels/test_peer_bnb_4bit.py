"""bitsandbytes' 4-bit matmul tests (tests/test_autograd.py ``test_matmul_4bit``, tests/test_functional.py
``test_gemv_4bit``, ``test_gemv_eye_4bit``, ``test_4bit_quant``, ``test_4bit_compressed_stats``),
ported to our fused NF4 LoRA linear, quant_type nf4, blocksize 64, with and without double quant.

The weight is quantised with ``bitsandbytes.functional.quantize_4bit`` as bitsandbytes' tests do
and handed to ``swkernels.nf4_lora_linear`` as the ``Params4bit`` a ``Linear4bit`` holds. With the
LoRA B zero (PEFT's initialisation) the op is the 4-bit matmul bitsandbytes tests; with a LoRA term
the peer is ``bnb.matmul_4bit`` plus PEFT's low-rank term. Case classes and their bounds:

* matmul_4bit (autograd): A (64, 64) ⊗ an xavier-uniform B (96, 64), fp16/bf16/fp32, bias or not,
  and an empty batch. The mean absolute error against the unquantised ``A @ Bᵀ`` must be below
  0.115, the output dtype is A's, and under the same upstream gradient (bitsandbytes' mse-loss
  gradient of the torch output) the input gradient matches torch's with the unquantised B at
  atol 0.015, rtol 0.1, and the bias gradient matches exactly. We add: with B = 0 the output
  equals ``bnb.matmul_4bit`` at our per-dtype tolerance; and the output and every gradient are no
  further (max abs, within 2× + the dtype's atol) from the same maths in fp32 over the dequantised
  weight than ``bnb.matmul_4bit`` + PEFT's branch under autocast are.
* gemv_4bit: one token through fc1 (dim → 4·dim), fc2 (4·dim → dim), attn (dim → dim) and
  attn_packed (dim → 3·dim) weights scaled by 1/√dim, any quant_storage dtype. With err1 = ours
  vs bitsandbytes (mean, relative mean, max; each ÷ √dim), err2 = bitsandbytes vs torch and
  err3 = ours vs torch: bitsandbytes' bounds for dim ≤ 512 on err1 (fp16 7e-5 / 8e-4; fp32
  5e-8 / 1e-6; bf16 6e-4 / 0.007 / max 0.015), and err2/err3 within 0.995…1.005 (relative: bf16
  0.96…1.04): our result is as far from the exact product as theirs. In place of the fp32 max
  bound (1e-7, which two fp32 summation orders exceed; see GEMV_BOUNDS): our max distance to the
  fp64 product over the dequantised weight is at most twice bitsandbytes'.
* gemv_eye: B = I (quantises exactly), A ~ N(0, 0.1): the output is A, at torch's default tolerance.
* 4bit_quant / compressed_stats: the weight the kernel reads (read back through x = I, bitwise
  equal to bitsandbytes' dequantize_4bit) and the quantisation error of a 1024×1024 N(0, 1)
  matrix: nf4 blocksize 64 mean error < 0.072792 + 1e-3 and mean relative error
  < 0.203299 + 1e-3; with double quant < 0.11 and < 0.28.

bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` (which its CPU ``matmul_4bit`` uses) is wrong
when blocks straddle rows and in_features is a multiple of 16 (16, 32, 48, 80, 96, …: errors of
order 1 on N(0, 1) weights; 100 or 129 come out right), so bitsandbytes is the oracle only for
in_features a multiple of 64, as in all of its own cases; the in_features = 96 variant of the
matmul case compares with our reference dequantisation (:meth:`NF4Weight.dequantize`, checked
against bitsandbytes' pure-torch implementation in tests/kernels/test_nf4_lora_linear.py) + a
torch matmul, and keeps the 0.115 bound against the unquantised product.

Shapes are bitsandbytes' own except gemv's dim (128; attn also at 256 and the full kind × dtype ×
double-quant matrix under ``-m slow``; bitsandbytes goes to 1024) with 1 iteration instead of 10.
The 1024×1024 quantisation error is read through the reference dequantisation, which the kernel
readback (96×64, through x = I) is bitwise equal to.
"""

import math
import os

import numpy as np
import pytest
import torch

import swkernels
from swkernels import reference
from swkernels.ops.nf4_lora_linear import nf4_state
from tests.utils import DTYPES, TOL, assert_close

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

# bitsandbytes' CPU backend logs that an optional kernel package is missing; harmless
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BLOCKSIZE = 64
RANK = 4


@pytest.fixture(autouse=True, scope="module")
def _round_to_nearest_even_in_the_interpreter():
    """bitsandbytes' bf16 bounds assume fp32 → bf16 conversions round to nearest even, as torch and
    every GPU do (a Triton ``.to(tl.bfloat16)`` compiles to cvt.rn). Triton 3.9's CPU interpreter
    truncates instead, which shrinks every dequantised weight and every output towards zero by up to
    an ulp and fails the bounds on the CPU only. While this module runs, the interpreter converts
    the way the GPU does; nothing else about the kernels changes."""
    if not os.environ.get("TRITON_INTERPRET"):
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if not (src == tl.float32 and dst == tl.bfloat16):
            return original(data, src, dst, rounding_mode)
        bits = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint32)
        out = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # stays a (quiet) NaN
        return out.reshape(np.shape(data))

    interpreter._convert_float = convert
    yield
    interpreter._convert_float = original


def quantize(w: torch.Tensor, double_quant: bool, storage: torch.dtype = torch.uint8):
    """W quantised by ``quantize_4bit`` (as bitsandbytes' tests do), held as Linear4bit holds it."""
    packed, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4",
                                       quant_storage=storage)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                             compress_statistics=double_quant, quant_type="nf4", quant_storage=storage,
                             bnb_quantized=True)


def lora(n, k, zero_b, device):
    """fp32 adapters as the trainer keeps them: A Kaiming-like, B zero (PEFT's start) or random."""
    a = (torch.randn(RANK, k, device=device) / math.sqrt(k)).requires_grad_()
    b = torch.zeros(n, RANK, device=device) if zero_b else torch.randn(n, RANK, device=device) / math.sqrt(RANK)
    return a, b.requires_grad_()


def peer_lora_term(x, a, b, scaling):
    """PEFT's low-rank branch as it runs under autocast: lora_B(lora_A(x)) · s in x's dtype."""
    return (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * scaling


# --- test_autograd.py: test_matmul_4bit --------------------------------------------------------------

# (tokens, in_features, out_features, double quant, bias): bitsandbytes' (dim2, dim3, dim4) with and
# without double quant and the empty batch, each without bias and with B = 0 (PEFT's start) or with a
# bias and a LoRA term; and K = 96, where bnb's CPU dequantize is wrong, with bias and LoRA term
MATMUL_CASES = [pytest.param(m, k, 96, dq, has_bias, not has_bias,
                             id=f"{m}x{k}x96-{'dq' if dq else 'nf4'}-{'bias+lora' if has_bias else 'zeroB'}"
                                f"{'-ownref' if k % 64 else ''}")
                for m, k, dq, biases in ((64, 64, False, (False, True)), (64, 64, True, (False, True)),
                                         (0, 64, True, (False, True)), (64, 96, True, (True,)))
                for has_bias in biases]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("m,k,n,double_quant,has_bias,zero_b", MATMUL_CASES)
def test_matmul_4bit(m, k, n, dtype, double_quant, has_bias, zero_b, device):
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = torch.empty(n, k, device=device, dtype=dtype)
    torch.nn.init.xavier_uniform_(w)
    bias = torch.randn(n, device=device, dtype=dtype, requires_grad=True) if has_bias else None
    target = torch.randn(m, n, device=device, dtype=dtype)
    p = quantize(w, double_quant)
    a, b = lora(n, k, zero_b, device)
    scaling = 2.0

    y = swkernels.nf4_lora_linear(x, p, a, b, scaling, bias)
    assert y.dtype == dtype and y.shape == (m, n)

    # the weight as bitsandbytes dequantises it, or as our reference does where bitsandbytes' CPU
    # dequantize is wrong (K = 96; see the module docstring)
    bnb_is_right = k % BLOCKSIZE == 0
    w_deq = bnbf.dequantize_4bit(p.data, p.quant_state) if bnb_is_right else nf4_state(p).dequantize().to(dtype)
    outputs = {
        "exact": x @ w.t() + peer_lora_term(x, a, b, scaling) + (bias if has_bias else 0),  # unquantised W
        "reference": reference.lora_linear(x, w_deq.float(), a, b, scaling, bias),  # fp32 maths, one rounding
        "peer": (bnb.matmul_4bit(x, p.data.t(), p.quant_state, bias=bias) if bnb_is_right
                 else torch.nn.functional.linear(x, w_deq, bias)) + peer_lora_term(x, a, b, scaling),
    }
    if m:
        assert (y - outputs["exact"]).abs().float().mean().item() < 0.115
    if zero_b:  # the plain 4-bit matmul: equal to bitsandbytes' within rounding
        assert_close(y, outputs["peer"], name="y vs bitsandbytes")

    # backward under bitsandbytes' upstream gradient: that of mse(torch output, target)
    exact_d = outputs["exact"].detach().requires_grad_()
    (dy,) = torch.autograd.grad(torch.nn.functional.mse_loss(exact_d, target), exact_d)
    wrt = (x, a, b) + ((bias,) if has_bias else ())
    names = ("y", "dx", "dA", "dB", "dbias")
    ours = (y, *torch.autograd.grad(y, wrt, dy, retain_graph=True))
    theirs = {key: (out, *torch.autograd.grad(out, wrt, dy)) for key, out in outputs.items()}
    # bitsandbytes' gradA check (its A is our input x): against the unquantised weight
    torch.testing.assert_close(ours[1], theirs["exact"][1], atol=0.015, rtol=0.1)
    if has_bias:
        torch.testing.assert_close(ours[-1], theirs["exact"][-1])
    # every output and gradient: no further from the fp32 maths than bitsandbytes + PEFT are (the
    # kernel, like PEFT under autocast, rounds the low-rank intermediate to the compute dtype)
    for name, got, ref, peer in zip(names, ours, theirs["reference"], theirs["peer"], strict=False):
        assert got.dtype == peer.dtype, name
        d_ours, d_peer = ((t.float() - ref.float()).abs().max().item() if t.numel() else 0.0 for t in (got, peer))
        assert d_ours <= 2 * d_peer + TOL[dtype][0], f"{name}: ours {d_ours:.3g} vs bitsandbytes {d_peer:.3g}"


# --- test_functional.py: test_gemv_4bit -----------------------------------------------------------------

KINDS = {"fc1": (1, 4), "fc2": (4, 1), "attn": (1, 1), "attn_packed": (1, 3)}  # (in, out) multiples of dim
# bitsandbytes' dim ≤ 512 bounds: (mean, relative mean, max) of |ours − bnb| / √dim, and err2/err3 ratio ranges.
# Its fp32 max bound (1e-7·√dim) is tighter than the spread of fp32 summation orders over K = 4·dim terms
# (it compares two bitsandbytes paths that sum alike; ours is 1.3e-7·√dim from bnb at fc2 while twice as
# close to the fp64 product): for every dtype, the max distance to the fp64 product is checked instead.
GEMV_BOUNDS = {torch.float16: ((7e-5, 8e-4, None), (0.995, 1.005), (0.995, 1.005)),
               torch.float32: ((5e-8, 1e-6, None), (0.995, 1.005), (0.995, 1.005)),
               torch.bfloat16: ((6e-4, 0.007, 0.015), (0.995, 1.005), (0.96, 1.04))}


def check_gemv(kind, dim, dtype, double_quant, storage, device, iters=1):
    fan_in, fan_out = (dim * f for f in KINDS[kind])
    err = {i: [] for i in (1, 2, 3)}
    rel = {i: [] for i in (1, 2, 3)}
    top = {i: [] for i in (1, 2, 3)}
    to_fp64 = {"ours": 0.0, "bnb": 0.0}  # max distance to the fp64 product over the dequantised weight
    for _ in range(iters):
        x = torch.randn(1, fan_in, device=device, dtype=dtype)
        w = torch.randn(fan_out, fan_in, device=device, dtype=dtype) / math.sqrt(dim)
        p = quantize(w, double_quant, storage)
        a, b = lora(fan_out, fan_in, True, device)
        exact = x @ w.t()
        theirs = bnb.matmul_4bit(x, p.data.t(), p.quant_state)
        ours = swkernels.nf4_lora_linear(x, p, a, b, 1.0)
        for i, (u, v, mag) in {1: (ours, theirs, theirs), 2: (exact, theirs, exact), 3: (exact, ours, exact)}.items():
            d = (u - v).abs().float()
            err[i].append(d.mean().item())
            rel[i].append((d / (mag.abs().float() + 1e-5)).mean().item())
            top[i].append(d.max().item())
        exact_q = x.double() @ bnbf.dequantize_4bit(p.data, p.quant_state).double().t()
        for name, out in (("ours", ours), ("bnb", theirs)):
            to_fp64[name] = max(to_fp64[name], (out.double() - exact_q).abs().max().item())

    def avg(xs):
        return sum(xs) / len(xs) / math.sqrt(dim)

    (mean_b, rel_b, max_b), abs_ratio, rel_ratio = GEMV_BOUNDS[dtype]
    assert avg(err[1]) < mean_b, f"mean |ours - bnb| / sqrt(dim) = {avg(err[1]):.3g}"
    assert avg(rel[1]) < rel_b, f"relative |ours - bnb| / sqrt(dim) = {avg(rel[1]):.3g}"
    if max_b is not None:
        assert avg(top[1]) < max_b, f"max |ours - bnb| / sqrt(dim) = {avg(top[1]):.3g}"
    assert to_fp64["ours"] <= 2 * to_fp64["bnb"], f"max distance to the fp64 product: {to_fp64}"
    ratio = avg(err[2]) / avg(err[3])
    assert abs_ratio[0] < ratio < abs_ratio[1], f"bnb/ours distance to the exact product: {ratio:.4f}"
    ratio = avg(rel[2]) / avg(rel[3])
    assert rel_ratio[0] < ratio < rel_ratio[1], f"bnb/ours relative distance to the exact product: {ratio:.4f}"


# each kind, dtype, double quant setting and quant_storage at least once
GEMV_CASES = [("fc1", torch.float16, True, torch.uint8), ("fc2", torch.bfloat16, False, torch.bfloat16),
              ("attn", torch.float32, True, torch.float16), ("attn_packed", torch.bfloat16, True, torch.float32),
              ("fc1", torch.float32, False, torch.uint8)]


@pytest.mark.parametrize("kind,dtype,double_quant,storage", [
    pytest.param(*c, id=f"{c[0]}-{str(c[1])[6:]}-{'dq' if c[2] else 'nodq'}-{str(c[3])[6:]}") for c in GEMV_CASES])
def test_gemv_4bit(kind, dtype, double_quant, storage, device):
    check_gemv(kind, 128, dtype, double_quant, storage, device)


@pytest.mark.slow  # bitsandbytes' kind × dtype × double-quant matrix (uint8 storage) at dim 128, and attn at 256
@pytest.mark.parametrize("kind,dim", [*((kind, 128) for kind in KINDS), ("attn", 256)])
@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemv_4bit_matrix(kind, dim, dtype, double_quant, device):
    check_gemv(kind, dim, dtype, double_quant, torch.uint8, device)


# --- test_functional.py: test_gemv_eye_4bit --------------------------------------------------------------

@pytest.mark.parametrize("dim", [192, pytest.param(576, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gemv_eye_4bit(dtype, dim, device):
    x = torch.normal(0, 0.1, size=(1, 1, dim), device=device, dtype=dtype)
    p = quantize(torch.eye(dim, device=device, dtype=dtype), False)
    a, b = lora(dim, dim, True, device)
    torch.testing.assert_close(swkernels.nf4_lora_linear(x, p, a, b, 1.0), x)
    torch.testing.assert_close(bnb.matmul_4bit(x, p.data.t(), p.quant_state), x)


# --- test_functional.py: test_4bit_quant, test_4bit_compressed_stats --------------------------------------

@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_kernel_reads_the_weight_bitsandbytes_dequantizes(dtype, double_quant, device):
    """x = I: the kernel's output is the dequantised Wᵀ, elementwise as bitsandbytes computes it."""
    k, n = 64, 96
    p = quantize(torch.randn(n, k, device=device, dtype=dtype), double_quant)
    a, b = lora(n, k, True, device)
    read_back = swkernels.nf4_lora_linear(torch.eye(k, device=device, dtype=dtype), p, a, b, 1.0).t()
    torch.testing.assert_close(read_back, bnbf.dequantize_4bit(p.data, p.quant_state), atol=0, rtol=0)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_4bit_quantisation_error(dtype, double_quant, device):
    w = torch.randn(1024, 1024, device=device, dtype=dtype)  # smaller: the relative error's heavy tail
    # (|w| near 0) puts the sample mean past bitsandbytes' bound for some seeds at 512 × 512
    p = quantize(w, double_quant)
    deq = nf4_state(p).dequantize().to(dtype)  # what the kernel reads (test above, and the readback one)
    torch.testing.assert_close(deq, bnbf.dequantize_4bit(p.data, p.quant_state), atol=0, rtol=0)
    e = (w - deq).abs().float()
    mean_err, rel_err = e.mean().item(), (e / (w.abs().float() + 1e-8)).mean().item()
    bound = (0.11, 0.28) if double_quant else (0.072792 + 1e-3, 0.203299 + 1e-3)
    assert mean_err < bound[0] and rel_err < bound[1], (mean_err, rel_err)
