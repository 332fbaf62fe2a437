"""Liger-Kernel's RoPE test cases (test/transformers/test_rope.py), ported to apply_rope.

Liger checks two things, and so do we, at its tolerances (fp32: atol 1e-5, rtol 1e-5; bf16:
atol 1e-1, rtol 1e-5), forward and both input gradients under a random upstream gradient:

* ``correctness``: the kernel against transformers' own path, ``LlamaRotaryEmbedding`` (cos/sin
  in the model dtype) + ``apply_rotary_pos_emb``, on q/k laid out as attention makes them
  ((B, T, H, D) projections viewed as (B, H, T, D)), with equal head counts, GQA (32/8), and
  "weird" shapes whose kv head count is larger than and not a multiple of the q head count
  (73/213, 73/155) with head_dim 92; position ids either (1, T) or expanded to (B, T) (a
  stride-0 batch dimension).
* ``functional correctness``: two entry points of the same kernel agree — here the functional
  ``apply_rope`` with the θ=10000 ``inv_freq`` table against the module path
  (``swkernels.nn.RotaryEmbedding`` handing ``RopeArgs`` to the kernel, as patched attention uses
  it) and the in-place ``apply_rope_``, on tiny shapes (T=2, one q head with two kv heads) and
  an odd one (41 heads of odd head_dim 41); and, as everywhere here, against transformers.

Shapes are scaled down (sequence and head counts) so the interpreter runs them in seconds; the
head-count relations (equal, divisible, kv > q and not divisible) and head_dim are kept. One of
Liger's own sizes runs under ``-m slow``.

Convention difference, odd head_dim: transformers' rotate_half needs an even head_dim (Liger's
file says so, and skips HF for it). Our kernel rotates the first 2·len(inv_freq) dims and passes
the rest through (partial rotary), so head_dim 41 is rotated on 40 dims with one dim copied; the
peer there is transformers' apply_rotary_pos_emb on those 40 dims plus the untouched last one,
which is how transformers' partial-rotary models (Phi-3, NeoX) apply it.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import swkernels
from swkernels import reference
from swkernels.nn import RotaryEmbedding
from tests.kernels.test_rope import hf_rope, hf_rotary, inv_freq
from tests.utils import assert_close

# Liger's (dtype, atol, rtol)
LIGER_TOL = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-1, 1e-5)]
TOL_IDS = ["fp32", "bf16"]

# (bsz, seq_len, num_q_heads, num_kv_heads, head_dim): Liger's list with seq and heads scaled down
CORRECTNESS_SHAPES = [
    (1, 4, 8, 8, 64),  # Liger: (1, 128, 32, 32, 64)
    (2, 4, 8, 8, 64),  # (2, 128, 32, 32, 64)
    (1, 4, 8, 2, 64),  # (1, 128, 32, 8, 64): GQA
    (2, 4, 8, 2, 64),  # (2, 128, 32, 8, 64)
    (3, 3, 7, 21, 92),  # (3, 423, 73, 213, 92): more kv heads than q heads, not a multiple
    (3, 3, 7, 15, 92),  # (3, 423, 73, 155, 92)
]
FUNCTIONAL_SHAPES = [(1, 2, 2, 2, 8), (1, 2, 1, 2, 8), (2, 3, 41, 41, 41)]  # Liger's; the last from (9, 7, 41, 41, 41)


def with_positions(shapes):
    """Liger crosses every shape with (1, T) and expanded (B, T) position ids; with B = 1 the two
    are the same tensor, so only batches > 1 get both."""
    return [pytest.param(s, e, id=f"{shape_id(s)}-{'posBxT' if e else 'pos1xT'}")
            for s in shapes for e in ((True, False) if s[0] > 1 else (False,))]


def shape_id(s):
    return "b{}t{}hq{}hkv{}d{}".format(*s)


def positions(bsz, seq_len, expand, device):
    pos = torch.arange(seq_len, device=device, dtype=torch.long).unsqueeze(0)
    return pos.expand(bsz, -1) if expand else pos


def qk(bsz, seq_len, hq, hkv, head_dim, dtype, device, attention_layout=True):
    """Random q, k (B, H, T, D); with ``attention_layout`` as (B, T, H, D) storage, transposed."""
    if attention_layout:
        q = torch.randn(bsz, seq_len, hq, head_dim, device=device).transpose(1, 2).to(dtype)
        k = torch.randn(bsz, seq_len, hkv, head_dim, device=device).transpose(1, 2).to(dtype)
    else:
        q = torch.randn(bsz, hq, seq_len, head_dim, device=device, dtype=dtype)
        k = torch.randn(bsz, hkv, seq_len, head_dim, device=device, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_()


def rotate_and_grads(fn, q, k, dq, dk):
    qo, ko = fn(q, k)
    return (qo, ko, *torch.autograd.grad((qo, ko), (q, k), (dq, dk)))


def check_correctness(shape, dtype, atol, rtol, expand, device):
    bsz, seq_len, hq, hkv, head_dim = shape
    q, k = qk(*shape, dtype, device)
    pos = positions(bsz, seq_len, expand, device)
    cos, sin, inv, factor = hf_rotary(head_dim, hq, dtype, device, pos)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    ours = rotate_and_grads(lambda a, b: swkernels.apply_rope(a, b, pos, inv, factor), q, k, dq, dk)
    peer = rotate_and_grads(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin), q, k, dq, dk)
    for name, got, want in zip(("q", "k", "dq", "dk"), ours, peer, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert ours[0].stride() == q.stride()  # outputs keep attention's (B, T, H, D) storage

    ref = rotate_and_grads(lambda a, b: reference.apply_rope(a, b, pos, inv, factor), q, k, dq, dk)
    for name, got, want in zip(("q", "k", "dq", "dk"), ours, ref, strict=True):
        assert_close(got, want, scale=4, name=f"{name} vs reference")


@pytest.mark.parametrize("dtype,atol,rtol", LIGER_TOL, ids=TOL_IDS)
@pytest.mark.parametrize("shape,expand_position_ids", with_positions(CORRECTNESS_SHAPES))
def test_correctness_vs_transformers(shape, dtype, atol, rtol, expand_position_ids, device):
    check_correctness(shape, dtype, atol, rtol, expand_position_ids, device)


@pytest.mark.slow  # one of Liger's own sizes, unscaled: 256 tokens × 40 heads in the interpreter
def test_correctness_vs_transformers_at_liger_size(device):
    check_correctness((2, 128, 32, 8, 64), torch.float32, 1e-5, 1e-5, True, device)


@pytest.mark.parametrize("dtype,atol,rtol", LIGER_TOL, ids=TOL_IDS)
@pytest.mark.parametrize("shape,expand_position_ids", with_positions(FUNCTIONAL_SHAPES))
def test_functional_and_module_entry_points_agree(shape, dtype, atol, rtol, expand_position_ids, device):
    bsz, seq_len, hq, hkv, head_dim = shape
    q, k = qk(*shape, dtype, device, attention_layout=False)
    pos = positions(bsz, seq_len, expand_position_ids, device)
    rotary_dim = head_dim - head_dim % 2  # odd head_dim: the last dim passes through (see module doc)
    config = LlamaConfig(hidden_size=hq * head_dim, num_attention_heads=hq, num_key_value_heads=hkv,
                         head_dim=head_dim, partial_rotary_factor=rotary_dim / head_dim)
    module = RotaryEmbedding(config, device=device)
    module.fused = True
    args = module(q, pos)  # RopeArgs: what patched attention passes to the kernel
    inv = inv_freq(rotary_dim).to(device)
    torch.testing.assert_close(args.inv_freq, inv, atol=0, rtol=0)  # the same table as transformers'
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    functional = rotate_and_grads(lambda a, b: swkernels.apply_rope(a, b, pos, inv), q, k, dq, dk)
    via_module = rotate_and_grads(lambda a, b: swkernels.apply_rope(a, b, *args), q, k, dq, dk)
    for name, got, want in zip(("q", "k", "dq", "dk"), functional, via_module, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")

    q2, k2 = q.detach().clone(), k.detach().clone()
    swkernels.apply_rope_(q2, k2, pos, inv)
    torch.testing.assert_close(q2, functional[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(k2, functional[1], atol=atol, rtol=rtol)

    # and the peer: transformers' rotate_half on the rotary dims (cos/sin in the model dtype)
    peer = rotate_and_grads(lambda a, b: hf_rope(a, b, pos, inv, 1.0, dtype), q, k, dq, dk)
    for name, got, want in zip(("q", "k", "dq", "dk"), functional, peer, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n} vs HF: {m}")
