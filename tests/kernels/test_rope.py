"""apply_rope: forward/backward vs transformers' apply_rotary_pos_emb and our reference."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from swkernels.ops.rope import rope_op
from tests.utils import DTYPES, assert_close, collect_each_op

# (batch, q heads, kv heads, seq, head_dim, rotary_dim): odd seq, GQA, head dims 64/80/96/128/256, partial
# rotary (Phi-3/4-style 96 of 128 dims, Phi-2-style 32 of 80, NeoX-style 32 of 128: the pass-through
# spans several copy chunks), head counts that are not multiples of the head tile (20 q heads, 1 kv)
CASES = [(2, 4, 2, 37, 64, 64), (1, 6, 6, 19, 80, 80), (1, 4, 1, 23, 96, 96), (2, 8, 2, 13, 128, 128),
         (1, 2, 1, 9, 256, 256), (1, 4, 2, 17, 96, 64), (1, 3, 1, 7, 128, 96), (1, 20, 5, 5, 80, 32),
         (1, 2, 1, 11, 128, 32)]


def inv_freq(dim, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))


def hf_rope(q, k, pos, inv, factor, dtype):
    """transformers' path: the rotary module's cos/sin (cast to the model dtype) + apply_rotary_pos_emb,
    with Phi-3's split for partial rotary."""
    freqs = pos[..., None].float() * inv.to(pos.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    qe, ke = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
    return torch.cat((qe, q_pass), dim=-1), torch.cat((ke, k_pass), dim=-1)


def make(case, dtype, device, packed=False):
    b, hq, hkv, t, d, rot = case
    # as attention produces them: (B, T, H, D) projections viewed as (B, H, T, D)
    q = torch.randn(b, t, hq, d, device=device).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hkv, d, device=device).to(dtype).transpose(1, 2).requires_grad_()
    if packed:  # two documents per row: positions restart
        cut = t // 2
        pos = torch.cat([torch.arange(cut), torch.arange(t - cut)]).to(device).repeat(b, 1)
    else:
        pos = (torch.arange(t, device=device) + 1000).repeat(b, 1)  # non-zero offset: large angles
    return q, k, pos, inv_freq(rot).to(device)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}t{c[3]}d{c[4]}r{c[5]}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_and_backward_match_reference_and_transformers(case, dtype, device):
    q, k, pos, inv = make(case, dtype, device, packed=case[0] == 2)
    factor = 1.17
    qo, ko = swkernels.apply_rope(q, k, pos, inv, factor)
    assert qo.shape == q.shape and qo.stride() == q.stride() and qo.dtype == dtype
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))

    qr, kr = reference.apply_rope(q, k, pos, inv, factor)
    dqr, dkr = torch.autograd.grad((qr, kr), (q, k), (gq, gk))
    for got, want in ((qo, qr), (ko, kr), (dq, dqr), (dk, dkr)):
        assert_close(got, want, scale=4)  # fp32 angles vs fp32 angles; outputs rounded once

    qh, kh = hf_rope(q, k, pos, inv, factor, dtype)  # cos/sin rounded to dtype first: one more rounding
    dqh, dkh = torch.autograd.grad((qh, kh), (q, k), (gq, gk))
    for got, want in ((qo, qh), (ko, kh), (dq, dqh), (dk, dkh)):
        assert_close(got, want, dtype, scale=8)


@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=["full", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_in_place_variant(case, dtype, device):
    q, k, pos, inv = make(case, dtype, device, packed=True)
    q, k = q.detach(), k.detach()  # still (B, T, H, D) storage viewed as (B, H, T, D)
    want = reference.apply_rope(q, k, pos, inv, 0.9)
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    out = swkernels.apply_rope_(q, k, pos, inv, 0.9)
    assert out[0] is q and out[1] is k and q.data_ptr() == q_ptr and k.data_ptr() == k_ptr
    assert_close(q, want[0])
    assert_close(k, want[1])
    assert torch.equal(q[..., case[5]:], want[0][..., case[5]:])  # pass-through dims untouched


def test_every_launchable_config_is_health_checked():
    from swkernels.ops.rope import launch_config
    from swkernels.registry import registered

    checked = [s.constexprs for s in registered() if s.op == "rope"]
    for rotary_dim in range(2, 257, 2):
        assert launch_config(rotary_dim // 2) in checked, rotary_dim


def test_backward_is_the_inverse_rotation(device):
    q, k, pos, inv = make(CASES[0], torch.float32, device)
    qo, ko = rope_op(q.detach(), k.detach(), pos, inv, 1.0, False)
    qb, kb = rope_op(qo, ko, pos, inv, 1.0, True)
    assert_close(qb, q.detach(), scale=10)
    assert_close(kb, k.detach(), scale=10)


def test_bad_shapes_say_how_to_fix():
    q, k, pos, inv = make(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="except for its head count"):
        swkernels.apply_rope(q, k[:, :, :5], pos, inv)
    with pytest.raises(ValueError, match="position_ids"):
        swkernels.apply_rope(q, k, pos[:, :5], inv)
    with pytest.raises(ValueError, match="position_ids"):  # neither the batch nor 1
        swkernels.apply_rope(q, k, pos[:1].expand(3, -1), inv)
    with pytest.raises(ValueError, match="position_ids"):
        swkernels.apply_rope(q, k, pos[0], inv)
    with pytest.raises(ValueError, match="head_dim/2"):
        swkernels.apply_rope(q, k, pos, torch.ones(40))
    with pytest.raises(ValueError, match="integer"):
        swkernels.apply_rope(q, k, pos.float(), inv)
    with pytest.raises(ValueError, match="share dtype"):
        swkernels.apply_rope(q, k.double(), pos, inv)


def test_custom_op_registration_is_consistent(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        q, k, pos, inv = make(CASES[0], torch.float32, device)
        torch.library.opcheck(rope_op, (q, k, pos, inv, 1.0, False))


@pytest.mark.slow  # 13 s in the interpreter
def test_fake_impl_allocates_what_the_kernel_allocates(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        import gc

        from torch._subclasses.fake_tensor import FakeTensorMode

        def step():
            q, k, pos, inv = make(CASES[0], torch.bfloat16, device)
            qo, ko = swkernels.apply_rope(q, k, pos, inv)
            (qo.float().sum() + ko.float().sum()).backward()
            gc.collect()

        with swkernels.force_backend("triton"), LiveBytes() as real, collect_each_op():
            step()
        with FakeTensorMode(), swkernels.force_backend("triton"), LiveBytes() as fake:
            step()
        assert fake.peak == real.peak > 0


def test_no_cos_sin_table_is_allocated():
    """The kernel path allocates only the two outputs; transformers' path builds (B, T, D) cos/sin."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 32, 32768, 128, dtype=torch.bfloat16)
        k = torch.empty(1, 8, 32768, 128, dtype=torch.bfloat16)
        pos, inv = torch.arange(32768)[None], inv_freq(128)
        with swkernels.force_backend("triton"), LiveBytes() as mem:
            swkernels.apply_rope(q, k, pos, inv)
    assert mem.peak == q.numel() * 2 + k.numel() * 2


def test_torch_compile_traces_the_op():
    q, k, pos, inv = make(CASES[0], torch.float32, "cpu")
    fn = torch.compile(lambda q, k: swkernels.apply_rope(q, k, pos, inv), backend="aot_eager", fullgraph=True)
    qo, _ = fn(q, k)
    assert_close(qo, reference.apply_rope(q, k, pos, inv)[0], scale=4)


@pytest.mark.gpu
def test_long_positions_on_gpu():
    """Positions up to 128K (angles ~1e5 rad): the in-kernel sin/cos must reduce the range as
    accurately as torch does (approximate hardware sin/cos would not)."""
    T = 131072
    q = torch.randn(1, T, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, T, 1, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pos, inv = torch.arange(T, device="cuda")[None], inv_freq(128, 500000.0).cuda()
    qo, ko = swkernels.apply_rope(q, k, pos, inv, 1.1)
    qr, kr = reference.apply_rope(q, k, pos, inv, 1.1)
    assert_close(qo, qr, scale=2)
    assert_close(ko, kr, scale=2)


def hf_rotary(head_dim, heads, dtype, device, pos):
    """cos/sin from transformers' own rotary module (LlamaRotaryEmbedding), in the model dtype."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                         rope_theta=10000.0, max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config).to(device)
    cos, sin = rotary(torch.empty(1, device=device, dtype=dtype), pos)
    return cos, sin, rotary.inv_freq, rotary.attention_scaling


# Hq=6, Hkv=4 (not multiples of each other) and (1, T) positions broadcast over B=3: transformers
# and Liger accept both (the kernel rotates each head on its own and reads the positions' strides)
@pytest.mark.parametrize("pos_batch", [1, 3], ids=["pos1xT", "posBxT"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_heads_that_do_not_divide_and_broadcast_positions_match_transformers(pos_batch, dtype, device):
    B, Hq, Hkv, T, D = 3, 6, 4, 9, 32
    pos = (torch.arange(T, device=device) + 500)[None].repeat(pos_batch, 1)
    q = torch.randn(B, T, Hq, D, device=device).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, D, device=device).to(dtype).transpose(1, 2).requires_grad_()
    cos, sin, inv, factor = hf_rotary(D, Hq, dtype, device, pos)

    qo, ko = swkernels.apply_rope(q, k, pos, inv, factor)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == ko.dtype == dtype
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))

    qh, kh = apply_rotary_pos_emb(q, k, cos, sin)  # cos/sin (pos_batch, T, D) broadcast over the batch
    dqh, dkh = torch.autograd.grad((qh, kh), (q, k), (gq, gk))
    for got, want in ((qo, qh), (ko, kh), (dq, dqh), (dk, dkh)):
        assert_close(got, want, dtype, scale=8)

    qr, kr = reference.apply_rope(q, k, pos, inv, factor)  # the reference broadcasts (1, T) too
    dqr, dkr = torch.autograd.grad((qr, kr), (q, k), (gq, gk))
    for got, want in ((qo, qr), (ko, kr), (dq, dqr), (dk, dkr)):
        assert_close(got, want, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_in_place_heads_that_do_not_divide_and_broadcast_positions(dtype, device):
    B, Hq, Hkv, T, D = 3, 6, 4, 7, 32
    pos = torch.arange(T, device=device)[None] + 100
    q = torch.randn(B, T, Hq, D, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device=device).to(dtype).transpose(1, 2)
    cos, sin, inv, _ = hf_rotary(D, Hq, dtype, device, pos)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    swkernels.apply_rope_(q, k, pos, inv)
    assert_close(q, want[0], dtype, scale=8)
    assert_close(k, want[1], dtype, scale=8)
