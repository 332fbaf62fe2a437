import pytest
import torch
import torch.nn.functional as F

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from tests.utils import DTYPES, assert_close

# The CPU interpreter evaluates σ with numpy, which warns when exp(−2z) overflows to inf for
# gate ≲ −10 (σ is then exactly 0, the right answer); compiled kernels do not warn.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

SHAPES = [(1,), (7, 13), (3, 41, 401), (2, 1031)]  # odd sizes: not multiples of the 1024 block


def _peer(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What Gemma's MLP computes: ACT2FN["gelu_pytorch_tanh"](gate) * up."""
    return F.gelu(gate, approximate="tanh") * up


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_and_grads_match_reference_and_torch(shape, dtype, device):
    gate = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)  # non-trivial upstream gradient

    out = swkernels.gelu_mul(gate, up)
    dg, du = torch.autograd.grad(out, (gate, up), grad)
    assert out.dtype == dg.dtype == du.dtype == dtype

    # oracle 1: our fp32 reference, differentiated by autograd
    ref = reference.gelu_mul(gate, up)
    rdg, rdu = torch.autograd.grad(ref, (gate, up), grad)
    assert_close(out, ref, name="out")
    assert_close(dg, rdg, name="d_gate")
    assert_close(du, rdu, name="d_up")

    # oracle 2: the peer, torch's own tanh-approximate gelu in fp32
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    peer = _peer(g32, u32)
    pdg, pdu = torch.autograd.grad(peer, (g32, u32), grad.float())
    assert_close(out, peer, dtype, name="out vs torch")
    assert_close(dg, pdg, dtype, name="d_gate vs torch")
    assert_close(du, pdu, dtype, name="d_up vs torch")


def test_closed_form_backward_matches_autograd():
    gate, up, grad = torch.randn(3, 50, dtype=torch.float64).unbind(0)
    gate = gate * 3
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    expected = torch.autograd.grad(_peer(g, u), (g, u), grad)
    got = reference.gelu_mul_backward(grad, gate, up)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_reference_backward_matches_kernel_backward(device):
    from swkernels.ops.gelu_mul import _gelu_mul_bwd_op

    gate, up, grad = (torch.randn(3, 7, 129, device=device) * 3).unbind(0)
    got = _gelu_mul_bwd_op(grad, gate, up)
    expected = reference.gelu_mul_backward(grad, gate, up)
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b)


def _truth64(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh in float64 via the exact identity ½(1 + tanh z) = σ(2z): free of the cancellation
    of 1 + tanh(z) for negative gates, which makes even float64 F.gelu return 0 for gate ≲ −7."""
    z = (2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)
    return gate * torch.sigmoid(2 * z) * up


def test_float64_truth_is_torch_gelu():
    g = torch.linspace(-5, 30, 701, dtype=torch.float64, requires_grad=True)
    u = torch.randn(701, dtype=torch.float64)
    a, b = _truth64(g, u), _peer(g, u)
    torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), g)[0], torch.autograd.grad(b.sum(), g)[0],
                               atol=1e-14, rtol=1e-12)


def test_precision_near_zero_and_at_large_magnitude(device):
    """fp32 kernel vs float64 truth, elementwise, for |gate| from 1e-30 to 16 on both sides, plus
    0, ±30 and ±1e4. The bound is relative to the value (so ½·1e-30 must be right, not merely
    "close to 0"), widened by the condition number of σ(2z) in its exp tail, ≈ |2z|: even an exactly
    rounded fp32 evaluation is off by |2z|·ε there. d_gate crosses 0 near gate ≈ −0.75, a sum of two
    O(|dh·u|) terms, so it also gets an absolute floor. (torch's own fp32 gelu, which forms
    1 + tanh(z), is off by up to 100% in the negative tail; this kernel is not.)"""
    mags = torch.logspace(-30, 1.2, 600, dtype=torch.float64)
    special = torch.tensor([0.0, 30.0, -30.0, 1e4, -1e4], dtype=torch.float64)
    g64 = torch.cat([mags, -mags, special]).float().double()  # the exact fp32 inputs
    u64 = torch.empty_like(g64).uniform_(0.5, 2.0).float().double()
    dh64 = torch.empty_like(g64).uniform_(-2.0, 2.0).float().double()
    z2 = 2 * (2 / torch.pi) ** 0.5 * (g64 + 0.044715 * g64**3)
    g64.requires_grad_()
    truth = _truth64(g64, u64)
    (tdg,) = torch.autograd.grad(truth, g64, dh64)
    g64, truth = g64.detach(), truth.detach()

    gate = g64.float().to(device).requires_grad_()
    up = u64.float().to(device).requires_grad_()
    out = swkernels.gelu_mul(gate, up)
    dg, du = torch.autograd.grad(out, (gate, up), dh64.float().to(device))
    rel = 1e-6 * (1 + z2.abs())  # ≈ 8ε, times the condition number
    for name, got, want, floor in [("out", out, truth, 1e-36), ("d_gate", dg, tdg, 5e-7 * (dh64 * u64).abs()),
                                   ("d_up", du, dh64 * truth / u64, 1e-36)]:
        got = got.detach().double().cpu()
        assert torch.isfinite(got).all(), name
        err, bound = (got - want).abs(), rel * want.abs() + floor
        i = int((err / bound).argmax())
        assert (err <= bound).all(), f"{name}: gate={g64[i].item():.6g} got {got[i].item():.9g} want {want[i].item():.9g}"

    # saturation is exact: gelu_tanh(30)·u = 30·u and gelu_tanh(−30)·u = 0; d/dgate = dh·u and 0
    out, dg = out.detach().cpu(), dg.cpu()
    n = 2 * mags.numel()
    assert out[n + 1] == 30 * up.detach().cpu()[n + 1] and out[n + 2] == 0
    assert dg[n + 1] == (dh64[n + 1] * u64[n + 1]).float() and dg[n + 2] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the discarded tl.where branch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_gates_saturate_without_nan(dtype, device):
    """g³ overflows fp32 for |g| ≳ 1e13 (bf16 holds such values): no NaN, clean 0/identity grads
    (torch's own fp32 gelu backward returns NaN here)."""
    gate = torch.tensor([-1e20, -1e13, 1e13, 1e20], device=device).to(dtype).requires_grad_()
    up = torch.ones(4, device=device, dtype=dtype).requires_grad_()
    out = swkernels.gelu_mul(gate, up)
    dg, du = torch.autograd.grad(out, (gate, up), torch.ones_like(out))
    g = gate.detach()
    torch.testing.assert_close(out.detach(), torch.where(g > 0, g, 0.0))
    torch.testing.assert_close(dg, (g > 0).to(dtype))
    torch.testing.assert_close(du, torch.where(g > 0, g, 0.0))


def test_non_contiguous_inputs(device):
    x = torch.randn(6, 40, device=device, requires_grad=True)
    gate, up = x[:, :20], x[:, 20:]  # column slices: strided views
    assert not gate.is_contiguous()
    grad = torch.randn(6, 20, device=device)
    out = swkernels.gelu_mul(gate, up)
    (dx,) = torch.autograd.grad(out, x, grad)
    expected = _peer(gate, up)
    (edx,) = torch.autograd.grad(expected, x, grad)
    assert_close(out, expected)
    assert_close(dx, edx)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        swkernels.gelu_mul(torch.randn(3, 4), torch.randn(4, 3))


def test_dtype_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="share dtype"):
        swkernels.gelu_mul(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))


def test_torch_backend_uses_the_reference():
    g, u = torch.randn(4, 9), torch.randn(4, 9)
    with swkernels.force_backend("torch"):
        assert_close(swkernels.gelu_mul(g, u), _peer(g, u))


def test_custom_op_registration_is_consistent(device):
    """torch's own checker: schema, fake impl, autograd registration and dispatch agree."""
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        from swkernels.ops.gelu_mul import _gelu_mul_bwd_op, _gelu_mul_op

        g, u = torch.randn(5, 33, requires_grad=True), torch.randn(5, 33, requires_grad=True)
        torch.library.opcheck(_gelu_mul_op, (g, u))
        torch.library.opcheck(_gelu_mul_bwd_op, (torch.randn(5, 33), g.detach(), u.detach()))


def test_fake_impl_allocates_what_the_kernel_allocates(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        from torch._subclasses.fake_tensor import FakeTensorMode

        def step(gate, up):
            out = swkernels.gelu_mul(gate, up)
            out.backward(torch.ones_like(out))
            return out

        shape = (64, 1000)
        with swkernels.force_backend("triton"), LiveBytes() as real:
            step(torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True))
        with FakeTensorMode(), swkernels.force_backend("triton"), LiveBytes() as fake:
            step(torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True))
        assert fake.peak == real.peak > 0


def test_torch_compile_traces_the_op():
    fn = torch.compile(lambda g, u: swkernels.gelu_mul(g, u) * 2, backend="aot_eager", fullgraph=True)
    g, u = torch.randn(4, 9), torch.randn(4, 9)
    assert_close(fn(g, u), 2 * _peer(g, u))
