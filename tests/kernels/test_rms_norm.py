import importlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from swkernels.nn.norm import GEMMA_STYLE, LLAMA_STYLE, RMSNorm, is_hf_rms_norm
from swkernels.ops import rms_norm as op
from tests.utils import DTYPES, TOL, assert_close, collect_each_op

# odd row lengths; (2, 3, 4, 64): a Qwen3 q/k norm on (b, t, heads, head_dim); 4500 > the largest
# BLOCK (4096), so the kernels walk the row in chunks
SHAPES = [(1, 7), (3, 5, 33), (2, 1031), (2, 3, 4, 64), (2, 4500)]
STYLES = ["llama", "gemma"]
_MODULES = {  # class name → transformers.models.<module>
    "LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "MixtralRMSNorm": "mixtral",
    "MinistralRMSNorm": "ministral", "Qwen2RMSNorm": "qwen2", "Qwen2MoeRMSNorm": "qwen2_moe",
    "Qwen3RMSNorm": "qwen3", "Qwen3MoeRMSNorm": "qwen3_moe", "Phi3RMSNorm": "phi3", "GraniteRMSNorm": "granite",
    "SmolLM3RMSNorm": "smollm3", "GemmaRMSNorm": "gemma", "Gemma2RMSNorm": "gemma2", "Gemma3RMSNorm": "gemma3",
    "Qwen3NextRMSNorm": "qwen3_next", "Olmo2RMSNorm": "olmo2", "Llama4TextRMSNorm": "llama4",
}


def hf_class(name: str):
    mod = importlib.import_module(f"transformers.models.{_MODULES[name]}.modeling_{_MODULES[name]}")
    return getattr(mod, name, None)


def hf_norm(style: str, n: int, dtype: torch.dtype, device, eps: float = 1e-5) -> nn.Module:
    """A transformers RMSNorm (Llama's, or Gemma 3's — also its q/k norm) with a random weight."""
    m = hf_class("LlamaRMSNorm" if style == "llama" else "Gemma3RMSNorm")(n, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n) * 0.5 + (1.0 if style == "llama" else 0.0))
    return m


def assert_close_to_rounded_sum(dw, peer_dw, grad, x, dtype, name):
    """dw against a peer that rounds each per-row product dy ⊙ x̂ to the dtype before summing
    (transformers' ``weight * x̂.to(dtype)`` backward): the peer's own error grows with Σ|dy ⊙ x̂|,
    not with |Σ dy ⊙ x̂|, so that is the magnitude the relative tolerance applies to."""
    atol, rtol = TOL[dtype]
    x32 = x.detach().float().reshape(-1, x.shape[-1])
    xh = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    magnitude = (grad.float().reshape(-1, x.shape[-1]) * xh).abs().sum(0)
    err = (dw.float() - peer_dw.float()).abs()
    bound = atol + rtol * magnitude
    assert (err <= bound).all(), f"{name}: max error/bound {(err / bound).max().item():.3g} > 1"


class OpCalls(TorchDispatchMode):
    """Records the swkernels ops that run, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "swkernels":
            self.calls.append((func.name(), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_and_grads_match_reference_and_transformers(shape, dtype, style, device):
    gemma = style == "gemma"
    hf = hf_norm(style, shape[-1], dtype, device)
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)  # non-trivial upstream gradient

    out = swkernels.rms_norm(x, hf.weight, hf.variance_epsilon if not gemma else hf.eps, gemma=gemma)
    dx, dw = torch.autograd.grad(out, (x, hf.weight), grad)

    # oracle 1: our reference (transformers' casting), differentiated by autograd
    ref = reference.rms_norm(x, hf.weight, 1e-5, gemma)
    rdx, rdw = torch.autograd.grad(ref, (x, hf.weight), grad)
    assert out.dtype == ref.dtype == dtype
    assert_close(out, ref, name="out")
    assert_close(dx, rdx, name="dx")
    assert_close_to_rounded_sum(dw, rdw, grad, x, dtype, name="dw")

    # oracle 2: the transformers module itself
    peer = hf(x)
    pdx, pdw = torch.autograd.grad(peer, (x, hf.weight), grad)
    assert out.dtype == peer.dtype
    assert_close(out, peer, name="out vs transformers")
    assert_close(dx, pdx, name="dx vs transformers")
    assert_close_to_rounded_sum(dw, pdw, grad, x, dtype, name="dw vs transformers")

    # oracle 3: the closed form, in fp32 throughout (products and sums; one rounding at the end)
    cdx, cdw = reference.rms_norm_backward(grad, x.detach(), hf.weight.detach(), 1e-5, gemma)
    assert_close(dx, cdx, name="dx vs closed form")
    assert_close(dw, cdw, name="dw vs closed form")


@pytest.mark.parametrize("style", STYLES)
def test_fp32_weight_with_half_activations(style, device):
    """Mixed dtypes (e.g. fp32 master weights, bf16 activations) keep transformers' casting:
    llama style returns fp32 (weight * x̂.to(bf16)), gemma style bf16."""
    gemma = style == "gemma"
    hf = hf_norm(style, 300, torch.float32, device)
    x = torch.randn(4, 3, 300, device=device).to(torch.bfloat16).requires_grad_()
    grad_dtype = torch.bfloat16 if gemma else torch.float32
    grad = torch.randn(4, 3, 300, device=device).to(grad_dtype)

    out = swkernels.rms_norm(x, hf.weight, 1e-5, gemma=gemma)
    peer = hf(x)
    assert out.dtype == peer.dtype == grad_dtype
    dx, dw = torch.autograd.grad(out, (x, hf.weight), grad)
    pdx, pdw = torch.autograd.grad(peer, (x, hf.weight), grad)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close(out, peer, torch.bfloat16, name="out")
    assert_close(dx, pdx, name="dx")
    assert_close(dw, pdw, torch.bfloat16, name="dw")


@pytest.mark.parametrize("style", STYLES)
def test_closed_form_backward_matches_autograd(style):
    gemma = style == "gemma"
    x, grad = torch.randn(2, 3, 5, 50).unbind(0)  # fp32: transformers' casting computes in fp32 even for fp64
    w = torch.randn(50)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = torch.autograd.grad(reference.rms_norm(xr, wr, 1e-6, gemma), (xr, wr), grad)
    got = reference.rms_norm_backward(grad, x, w, 1e-6, gemma)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert reference.rms_norm_backward(grad, x, w, 1e-6, gemma, weight_grad=False)[1] is None


@pytest.mark.parametrize("style", STYLES)
def test_frozen_weight_gets_no_gradient_and_none_is_computed(style, device):
    """The LoRA case: the norm weight is frozen, so the backward computes dx only."""
    hf = hf_norm(style, 40, torch.bfloat16, device).requires_grad_(False)
    x = torch.randn(6, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(6, 40, device=device, dtype=torch.bfloat16)
    with OpCalls() as calls:
        swkernels.rms_norm(x, hf.weight, 1e-5, gemma=style == "gemma").backward(grad)
    (_, args), = [c for c in calls.calls if c[0] == "swkernels::rms_norm_backward"]
    assert args[-1] is False  # weight_grad: the kernel writes no dw products
    assert hf.weight.grad is None
    assert_close(x.grad, torch.autograd.grad(hf(x), x, grad)[0])
    # and a trainable weight asks the kernel for its gradient
    hf.weight.requires_grad_(True)
    with OpCalls() as calls:
        swkernels.rms_norm(x, hf.weight, 1e-5, gemma=style == "gemma").sum().backward()
    assert [args[-1] for name, args in calls.calls if name == "swkernels::rms_norm_backward"] == [True]
    assert hf.weight.grad is not None


def test_backward_saves_the_input_and_one_float_per_row_not_x_hat(device):
    x = torch.randn(8, 16, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, device=device, dtype=torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swkernels.rms_norm(x, w)
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in (x.data_ptr(), w.data_ptr())]
    assert len(saved) == 3 and len(extra) == 1
    assert extra[0].dtype == torch.float32 and extra[0].numel() == 8 * 16  # rstd
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference.rms_norm(x, w)
    assert sum(t.nbytes for t in saved) > x.nbytes + 8 * 16 * 4  # autograd of the reference keeps fp32 copies


def test_non_contiguous_inputs_and_gradients(device):
    base = torch.randn(2, 4, 6, 128, device=device)  # (b, heads, t, d) → (b, t, heads, d): strided
    x = base.transpose(1, 2).requires_grad_()
    w = torch.randn(128, device=device)
    grad = torch.randn(2, 4, 6, 128, device=device).transpose(1, 2)
    out = swkernels.rms_norm(x, w)
    dx, = torch.autograd.grad(out, x, grad)
    ref = reference.rms_norm(x, w)
    rdx, = torch.autograd.grad(ref, x, grad)
    assert_close(out, ref)
    assert_close(dx, rdx)
    # a column slice (rows not packed: read in place through the row stride) and a broadcast gradient
    x2 = torch.randn(5, 50, device=device)[:, :33].requires_grad_()
    w2 = torch.randn(33, device=device)
    g2 = torch.randn(33, device=device).expand(5, 33)
    out2 = swkernels.rms_norm(x2, w2)
    assert_close(out2, reference.rms_norm(x2, w2))
    assert_close(torch.autograd.grad(out2, x2, g2)[0], torch.autograd.grad(reference.rms_norm(x2, w2), x2, g2)[0])


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="weight must be"):
        swkernels.rms_norm(torch.randn(3, 4), torch.randn(5))
    with pytest.raises(ValueError, match="non-empty last dim"):
        swkernels.rms_norm(torch.randn(3, 0), torch.randn(0))


def test_every_launchable_block_is_registered():
    from swkernels.registry import registered

    specs = [s for s in registered() if s.op == "rms_norm"]
    for kernel in ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"):
        got = {(s.constexprs["BLOCK"], s.num_warps) for s in specs if s.kernel_name == kernel}
        assert got == set(op.BLOCK_WARPS.items())
    for n in (1, 64, 128, 257, 896, 1031, 4096, 4097, 16384, 40000):
        assert op.block_for(n) in op.BLOCK_CHOICES and (n > op.BLOCK_CHOICES[-1] or op.block_for(n) >= n)


def test_custom_op_registration_is_consistent(device):
    """torch's own checker: schema, fake impl, autograd registration and dispatch agree."""
    with torch.device(device):
        x, w = torch.randn(5, 33, requires_grad=True), torch.randn(33, requires_grad=True)
        torch.library.opcheck(op._rms_norm_op, (x, w, 1e-6, False))
        torch.library.opcheck(op._rms_norm_op, (x.detach().bfloat16().requires_grad_(), w, 1e-6, True))
        x, w = x.detach(), w.detach()  # the backward op has no double backward
        rstd = op._rms_norm_op(x, w, 1e-6, False)[1]
        for weight_grad in (False, True):
            torch.library.opcheck(op._rms_norm_bwd_op, (torch.randn(5, 33), x, w, rstd, False, weight_grad))


@pytest.mark.parametrize("trainable_weight", [False, True])
def test_fake_impl_allocates_what_the_kernel_allocates(trainable_weight, device):
    with torch.device(device):
        from torch._subclasses.fake_tensor import FakeTensorMode

        def step(x, w):
            out = swkernels.rms_norm(x, w)
            out.backward(torch.ones_like(out))
            return out

        def inputs():
            x = torch.randn(3, 21, 300, dtype=torch.bfloat16, requires_grad=True)
            return x, torch.randn(300, dtype=torch.bfloat16, requires_grad=trainable_weight)

        with swkernels.force_backend("triton"), LiveBytes() as real, collect_each_op():
            step(*inputs())
        with FakeTensorMode(), swkernels.force_backend("triton"), LiveBytes() as fake:
            step(*inputs())
        assert fake.peak == real.peak > 0


@pytest.mark.parametrize("name", sorted(LLAMA_STYLE | GEMMA_STYLE))
def test_from_hf_shares_the_weight_and_matches_transformers(name, device):
    cls = hf_class(name)
    if cls is None:
        pytest.skip(f"{name} is not in this transformers version")
    hf = cls(48, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        hf.weight.add_(torch.randn(48) * 0.3)
    style = "gemma" if name in GEMMA_STYLE else "llama"
    assert is_hf_rms_norm(hf) == style
    ours = RMSNorm.from_hf(hf)
    assert ours.weight is hf.weight and ours.eps == 1e-5 and ours.style == style
    assert list(ours.state_dict()) == list(hf.state_dict()) == ["weight"]
    x = torch.randn(2, 5, 48, device=device, dtype=torch.bfloat16)
    assert_close(ours(x), hf(x), name=name)


def test_unrecognised_norms_are_left_alone():
    for name in ("Olmo2RMSNorm", "Llama4TextRMSNorm"):  # (w · x̂).to(dtype) and x̂.type_as(x) · w: other roundings
        cls = hf_class(name)
        if cls is not None:
            assert is_hf_rms_norm(cls(16)) is None
    assert is_hf_rms_norm(nn.LayerNorm(16)) is None
    assert is_hf_rms_norm(RMSNorm(16)) is None
    with pytest.raises(TypeError, match="not a recognised"):
        RMSNorm.from_hf(nn.LayerNorm(16))


@pytest.mark.parametrize("gemma", [False, True])
def test_module_defaults_are_the_identity_scale(gemma, device):
    norm = RMSNorm(64, eps=1e-6, gemma=gemma, device=device)
    x = torch.randn(3, 64, device=device)
    assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_torch_backend_is_the_reference():
    x, w = torch.randn(4, 9), torch.randn(9)
    with swkernels.force_backend("torch"), OpCalls() as calls:
        out = swkernels.rms_norm(x, w)
    assert not calls.calls
    torch.testing.assert_close(out, reference.rms_norm(x, w))


def test_torch_compile_traces_the_op():
    fn = torch.compile(lambda x, w: swkernels.rms_norm(x, w, 1e-6, gemma=True) * 2, backend="aot_eager",
                       fullgraph=True)
    x, w = torch.randn(4, 9), torch.randn(9)
    assert_close(fn(x, w), 2 * reference.rms_norm(x, w, 1e-6, gemma=True))
