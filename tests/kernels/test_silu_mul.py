import pytest
import torch
import torch.nn.functional as F

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from tests.utils import DTYPES, assert_close

SHAPES = [(1,), (7, 13), (3, 41, 401), (2, 1031)]  # odd sizes: not multiples of the 1024 block


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_and_grads_match_reference_and_torch(shape, dtype, device):
    gate = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)  # non-trivial upstream gradient

    out = swkernels.silu_mul(gate, up)
    dg, du = torch.autograd.grad(out, (gate, up), grad)

    # oracle 1: our fp32 reference, differentiated by autograd
    ref = reference.silu_mul(gate, up)
    rdg, rdu = torch.autograd.grad(ref, (gate, up), grad)
    assert_close(out, ref, name="out")
    assert_close(dg, rdg, name="d_gate")
    assert_close(du, rdu, name="d_up")

    # oracle 2: the peer, torch's own silu in fp32
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    peer = F.silu(g32) * u32
    pdg, pdu = torch.autograd.grad(peer, (g32, u32), grad.float())
    assert_close(out, peer, dtype, name="out vs torch")
    assert_close(dg, pdg, dtype, name="d_gate vs torch")
    assert_close(du, pdu, dtype, name="d_up vs torch")


def test_closed_form_backward_matches_autograd():
    gate, up, grad = torch.randn(3, 50, dtype=torch.float64).unbind(0)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    expected = torch.autograd.grad(F.silu(g) * u, (g, u), grad)
    got = reference.silu_mul_backward(grad, gate, up)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_non_contiguous_inputs(device):
    x = torch.randn(6, 40, device=device)
    gate, up = x[:, :20], x[:, 20:]  # column slices: strided views
    assert not gate.is_contiguous()
    assert_close(swkernels.silu_mul(gate, up), F.silu(gate) * up)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        swkernels.silu_mul(torch.randn(3, 4), torch.randn(4, 3))


def test_custom_op_registration_is_consistent(device):
    """torch's own checker: schema, fake impl, autograd registration and dispatch agree."""
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        from swkernels.ops.silu_mul import _silu_mul_op

        g, u = torch.randn(5, 33, requires_grad=True), torch.randn(5, 33, requires_grad=True)
        torch.library.opcheck(_silu_mul_op, (g, u))


def test_fake_impl_allocates_what_the_kernel_allocates(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        from torch._subclasses.fake_tensor import FakeTensorMode

        def step(gate, up):
            out = swkernels.silu_mul(gate, up)
            out.backward(torch.ones_like(out))
            return out

        shape = (64, 1000)
        with swkernels.force_backend("triton"), LiveBytes() as real:
            step(torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True))
        with FakeTensorMode(), swkernels.force_backend("triton"), LiveBytes() as fake:
            step(torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True))
        assert fake.peak == real.peak > 0


def test_torch_compile_traces_the_op():
    fn = torch.compile(lambda g, u: swkernels.silu_mul(g, u) * 2, backend="aot_eager", fullgraph=True)
    g, u = torch.randn(4, 9), torch.randn(4, 9)
    assert_close(fn(g, u), 2 * F.silu(g) * u)
