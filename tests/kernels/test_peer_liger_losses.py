"""Liger-Kernel's loss test cases (test/transformers/test_cross_entropy.py,
test_fused_linear_cross_entropy.py, test_kl_div.py, test_jsd.py, test_fused_linear_jsd.py),
ported to ``fused_linear_cross_entropy``, ``distill_loss`` and ``fused_linear_distill`` at Liger's
tolerances (atol, rtol per dtype, as ``torch.allclose`` applies them).

How their APIs map onto ours:

* Cross-entropy on given logits (N, V): our fused op with a frozen identity head (V × V), which
  passes the logits through exactly in every dtype (one nonzero product per output) and returns
  ∂/∂logits as ∂/∂hidden. The peer is torch's ``cross_entropy`` on the logits upcast to fp32 (the
  z-loss written out), cast back to their dtype, as Liger's z-loss and soft-cap cases do.
* KL and JSD take log-probabilities in Liger (x = log_softmax(randn)). Ours take logits and
  differentiate through their softmax, so the leaf here is the randn tensor: we get it as logits,
  the peer gets log_softmax of it (the same input values Liger's tests build) and autograd goes
  through that log_softmax (the per-token ``none`` losses are held to the bound that Liger's
  elementwise tolerance puts on their sums). That gradient, (q − p)/N, nearly cancels where q ≈ p (Liger's,
  −p/N w.r.t. log-probabilities, does not), so the peer computes in fp32 and rounds once, like
  ours: torch's bf16 ops on the CPU round intermediates, which those entries do not survive at
  atol 1e-8. KLDivLoss's ``mean`` (over all N·V elements) is our ``sum`` / (N·V);
  its ``none`` (N, V) summed over V is our per-token ``none``, which we also differentiate under a
  random per-token upstream gradient (Liger stops before the backward there).
* Fused linear JSD: ``fused_linear_distill(kind="jsd", alpha=1)`` without ×T², as Liger's peer.

Not ported: class weights (``ce_weight``) and ``return_z_loss`` (we have neither: the z-loss is
part of the per-token loss). Liger's KL test passes softmax probabilities as ``log_target=True``
targets, i.e. an unnormalised target distribution; our ops compare two distributions, so the
log-target case here passes log-probabilities. Liger's amp test leaves the two models' biases
independently initialised; here they share one bias, as the weights do.

Shapes are Liger's scaled down for the interpreter (tokens and vocabularies); odd vocabularies
stay odd. The default run takes the smaller shape of each pair with a spread of dtypes and
options; the slow set (``-m slow``) more of them, and the larger shapes in fp32 (and with every
option, for the fused linear CE).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import swkernels
from swkernels.ops._loss_kernels import launch_ce_rows

SLOW = pytest.mark.slow


def slow(*values):
    return pytest.param(*values, marks=SLOW)


def grid(*dims, quick=lambda *combo: True, keep=lambda *combo: True):
    """The product of parameter lists (entries are tuples) as pytest params: combinations that
    ``quick`` rejects run in the slow set, those that ``keep`` rejects are left out."""
    return [pytest.param(*itertools.chain(*combo), marks=() if quick(*combo) else SLOW)
            for combo in itertools.product(*dims) if keep(*combo)]


def ignore_some(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Liger's pattern: a random number (1 .. N/2) of random positions set to ignore_index."""
    n = labels.numel()
    k = int(torch.randint(1, max(2, n // 2), (1,)))
    labels[torch.randperm(n)[:k]] = ignore_index
    return labels


def close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------- cross-entropy on logits

CE_SHAPES = [slow(2, 16, 1024), (3, 5, 331)]  # Liger: (2, 4096, 32000) llama, (3, 423, 32000) weird
CE_DTYPES = [(torch.bfloat16, 1e-8, 5e-2), (torch.float32, 1e-8, 1e-6)]


def our_ce(logits, target, **kw):
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
    return swkernels.fused_linear_cross_entropy(logits, eye, target, **kw)


def peer_ce(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean", lse_square_scale=0.0,
            softcap=None):
    """torch's cross-entropy, as Liger's tests call it, on fp32 logits (soft-capped), plus
    ζ·logsumexp² of each non-ignored token, cast back to the logits' dtype. (Liger calls torch's
    plain cases in the logits' dtype, on a GPU; torch's bf16 cross-entropy on the CPU rounds its
    intermediates to bf16, which gradient entries that nearly cancel, softmax ≈ ε/V under label
    smoothing, do not survive at atol 1e-8.)"""
    z = logits.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = target != ignore_index
    per = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    per = per + torch.where(valid, lse_square_scale * torch.logsumexp(z, dim=-1) ** 2, 0.0)
    loss = {"none": per, "sum": per.sum(), "mean": per.sum() / valid.sum()}[reduction]
    return loss.to(logits.dtype)


def ce_case(B, T, V, dtype, atol, rtol, ignore_index=None, upstream_scale=1.0, random_upstream=False, **kw):
    """Liger's _test_correctness_* shape: the same logits into the peer and ours, loss and ∂/∂logits."""
    x = torch.randn(B * T, V, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randint(0, V, (B * T,))
    if ignore_index is not None:
        ignore_some(target, ignore_index)
        kw["ignore_index"] = ignore_index
    want = peer_ce(x1, target, **kw)
    got = our_ce(x2, target, **kw)
    close(got, want, atol, rtol)
    upstream = torch.randn_like(want) if random_upstream else torch.ones_like(want)
    (want * upstream_scale).backward(upstream)
    (got * upstream_scale).backward(upstream.float())
    close(x2.grad, x1.grad, atol, rtol)


@pytest.mark.parametrize("B,T,V", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_correctness(B, T, V, reduction, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, reduction=reduction)


@pytest.mark.parametrize("B,T,V", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_correctness_not_last_layer(B, T, V, reduction, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, reduction=reduction, upstream_scale=3.0)


@pytest.mark.parametrize("B,T,V,ignore_index", [slow(2, 16, 1024, 2), (3, 5, 331, -123)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_correctness_with_ignore_index(B, T, V, ignore_index, reduction, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("B,T,V,ignore_index,label_smoothing", [
    slow(2, 16, 1024, None, 0.1), (3, 5, 331, None, 0.1),  # Liger's label-smoothing case
    slow(2, 16, 1024, 1, 0.1), (3, 5, 331, -300, 0.2),  # ... with ignore_index
])
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_correctness_with_label_smoothing(B, T, V, ignore_index, label_smoothing, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, ignore_index=ignore_index, label_smoothing=label_smoothing)


@pytest.mark.parametrize("B,T,V", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_correctness_with_softcap(B, T, V, reduction, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, reduction=reduction, softcap=30.0)


@pytest.mark.parametrize("B,T,V", CE_SHAPES)
@pytest.mark.parametrize("lse_square_scale", [1e-4, 1e-5])  # PaLM, Chameleon
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_correctness_with_z_loss(B, T, V, lse_square_scale, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, lse_square_scale=lse_square_scale)


@pytest.mark.parametrize("B,T,V", CE_SHAPES)
@pytest.mark.parametrize("lse_square_scale", [1e-4, 1e-5])
@pytest.mark.parametrize("label_smoothing,ignore_index,reduction", [(0.1, 42, "mean"), (0.2, -42, "sum")])
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_correctness_with_z_loss_and_other_params(B, T, V, lse_square_scale, label_smoothing, ignore_index,
                                                     reduction, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, ignore_index=ignore_index, lse_square_scale=lse_square_scale,
            label_smoothing=label_smoothing, reduction=reduction)


@pytest.mark.parametrize("B,T,V", [(2, 2, 8), (9, 7, 41)])
@pytest.mark.parametrize("dtype,atol,rtol", CE_DTYPES, ids=["bf16", "fp32"])
def test_ce_functional_every_option_with_a_random_upstream_gradient(B, T, V, dtype, atol, rtol):
    ce_case(B, T, V, dtype, atol, rtol, ignore_index=0, lse_square_scale=1e-4, label_smoothing=0.1,
            reduction="mean", softcap=30.0, random_upstream=True)


@pytest.mark.parametrize("ignore_index", [2, -123])
def test_ce_out_of_bounds_target_is_an_error(ignore_index):
    x = torch.randn(15, 331, dtype=torch.bfloat16)
    target = ignore_some(torch.randint(0, 331, (15,)), ignore_index)
    target[torch.randperm(15)[:3]] = torch.randint(331, 662, (3,))
    with pytest.raises(ValueError, match="out of range"):
        our_ce(x, target, ignore_index=ignore_index)


def test_ce_kernel_computes_in_fp32_whatever_the_logits_dtype():
    """Liger's float32-internal check: bf16 logits give the losses of the same values in fp32
    exactly, and the fp32 gradient rounded once."""
    x = torch.randn(4, 32001, dtype=torch.bfloat16)
    y = torch.randint(0, 32001, (4,))
    g16, g32 = x.clone(), x.float()
    l16, l32 = torch.empty(4), torch.empty(4)
    launch_ce_rows(g16, y, l16, torch.full((1,), 0.25), -100, 0.0, None)
    launch_ce_rows(g32, y, l32, torch.full((1,), 0.25), -100, 0.0, None)
    assert torch.equal(l16, l32)
    close(g16, g32.bfloat16(), 0.0, 2**-7)  # one bf16 ulp apart at most (the interpreter's cast truncates)


# ---------------------------------------------------------------- fused linear cross-entropy

FLCE_SHAPES = [(2, 8, 64, 512), (2, 11, 31, 123)]  # Liger: (8, 128, 1024, 4096), (4, 47, 31, 123)
FLCE_TOL = [("mean", torch.bfloat16, 5e-3, 5e-2), ("mean", torch.float32, 1e-5, 5e-4),
            ("sum", torch.bfloat16, 5e0, 5e1), ("sum", torch.float32, 1e-3, 5e-2),
            ("none", torch.bfloat16, 5e0, 5e1), ("none", torch.float32, 1e-3, 5e-2)]
PLAIN = dict(label_smoothing=0.0, ignore_index=-100, lse_square_scale=0.0, softcap=None)
EXTRAS = dict(label_smoothing=0.1, ignore_index=42, lse_square_scale=1e-4, softcap=30.0)


def peer_lm_head_ce(x, weight, bias, target, reduction, label_smoothing, ignore_index, lse_square_scale, softcap):
    """Liger's torch LM head: the linear in its dtype, fp32 logits, soft-cap, CE + z-loss."""
    logits = F.linear(x, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return peer_ce(logits, target, ignore_index, label_smoothing, reduction, lse_square_scale)


def flce_case(B, T, H, V, dtype, atol, rtol, bias, reduction, params, autocast=None, random_upstream=False,
              weight=None, ignore=True):
    """Liger's LM-head CE cases: rand weights (and bias) shared by the peer and ours, randn inputs,
    some targets ignored; loss, ∂/∂x, ∂/∂W (when it trains) and ∂/∂bias."""
    n = B * T
    w = torch.rand(V, H, dtype=dtype) if weight is None else weight
    b = torch.rand(V, dtype=dtype) if bias else None
    x = torch.randn(n, H, dtype=dtype)
    target = torch.randint(0, V, (n,))
    if ignore:
        ignore_some(target, params["ignore_index"])
    leaves = [[x.clone().requires_grad_(), w.clone().requires_grad_(weight is None)] for _ in range(2)]
    if bias:
        for leaf in leaves:
            leaf.append(b.clone().requires_grad_())
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else torch.enable_grad
    with ctx():
        (x1, w1, *b1), (x2, w2, *b2) = leaves
        want = peer_lm_head_ce(x1, w1, b1[0] if bias else None, target, reduction, **params)
        got = swkernels.fused_linear_cross_entropy(x2, w2, target, bias=b2[0] if bias else None, reduction=reduction,
                                                   **params)
        close(got, want, atol, rtol)
        upstream = torch.randn_like(want) if random_upstream else torch.ones_like(want)
        want.backward(upstream)
        got.backward(upstream)
    for mine, theirs in zip(leaves[1], leaves[0], strict=True):
        if theirs.requires_grad:
            close(mine.grad, theirs.grad, atol, rtol)


@pytest.mark.parametrize("B,T,H,V,reduction,dtype,atol,rtol,bias,params", grid(
    FLCE_SHAPES, FLCE_TOL, [(False, PLAIN), (True, EXTRAS)],  # the larger shape with every option only
    keep=lambda shape, tol, case: shape == FLCE_SHAPES[1] or case[0],
    quick=lambda shape, tol, case: shape == FLCE_SHAPES[1] and case[0]))
def test_flce_correctness(B, T, H, V, reduction, dtype, atol, rtol, bias, params):
    flce_case(B, T, H, V, dtype, atol, rtol, bias, reduction, params)


@pytest.mark.parametrize("B,T,H,V,dtype,atol,rtol,bias", grid(
    [(2, 2, 8, 8), (9, 7, 41, 41)], [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)], [(True,), (False,)],
    quick=lambda shape, dtype, bias: shape[0] == 2 or (bias[0] and dtype[0] == torch.float32)))
def test_flce_functional_frozen_head_random_upstream(B, T, H, V, dtype, atol, rtol, bias):
    params = dict(label_smoothing=0.1, ignore_index=-100, lse_square_scale=1e-4, softcap=30.0)
    flce_case(B, T, H, V, dtype, atol, rtol, bias, "mean", params, random_upstream=True,
              weight=torch.randn(V, H, dtype=dtype), ignore=False)


@pytest.mark.parametrize("B,T,H,V", [slow(*FLCE_SHAPES[0]), FLCE_SHAPES[1]])
@pytest.mark.parametrize("bias,cast_dtype", [(True, torch.bfloat16), slow(True, torch.float16),
                                             slow(False, torch.bfloat16), (False, torch.float16)])
def test_flce_amp(B, T, H, V, bias, cast_dtype):
    flce_case(B, T, H, V, torch.float32, 5e-3, 5e-2, bias, "mean", PLAIN, autocast=cast_dtype, ignore=False)


# ---------------------------------------------------------------- KL divergence

DIV_DTYPES = [(torch.bfloat16, 1e-8, 5e-2), (torch.float32, 1e-8, 1e-6), (torch.float16, 1e-3, 1e-3)]
KL_SHAPES = [(1, 16, 4000), (3, 5, 1271)]  # Liger: (1, 4096, 32000), (41, 401, 1271)


def div_grid(shapes, *dims, quick=lambda dtype, *rest: True):
    """(B, T, V, dtype, atol, rtol, *dims) cases: the smaller shape by default where ``quick``
    allows it, else in the slow set; the larger shape in the slow set, fp32 only."""
    return grid(shapes, DIV_DTYPES, *dims, keep=lambda shape, dtype, *_: shape == shapes[1] or dtype[0] == torch.float32,
                quick=lambda shape, dtype, *rest: shape == shapes[1] and quick(dtype, *rest))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("B,T,V,dtype,atol,rtol,log_target,last_layer", div_grid(
    KL_SHAPES, [(True, True), (False, False)], quick=lambda dtype, flags: dtype[0] == torch.float32 or flags[0]))
def test_kl_div_correctness(B, T, V, log_target, last_layer, reduction, dtype, atol, rtol):
    """KLDivLoss(log_softmax(x), target) = KL(target‖softmax(x)): our forward KL, student x."""
    n = B * T
    x = torch.randn(n, V, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    log_p = torch.randn(n, V).log_softmax(-1)
    target = log_p if log_target else log_p.exp()
    want = F.kl_div(x1.float().log_softmax(-1), target, reduction=reduction, log_target=log_target)
    ours = {"batchmean": "mean", "sum": "sum", "mean": "sum", "none": "none"}[reduction]
    got = swkernels.distill_loss(x2, log_p, "forward_kl", reduction=ours)
    if reduction == "mean":
        got = got / (n * V)
    if reduction == "none":  # Liger compares the (N, V) elements; ours are their per-token sums:
        # each element within (atol, rtol) of the peer's puts a sum within Σ_v (atol + rtol·|element|)
        bound = V * atol + rtol * want.detach().abs().sum(-1)
        want = want.sum(-1)
        assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()
    else:
        close(got, want, atol, rtol)
    upstream = torch.randn(n) if reduction == "none" else torch.tensor(1.0 if last_layer else 2.0)
    want.backward(upstream)
    got.backward(upstream)
    close(x2.grad, x1.grad, atol, rtol)


# ---------------------------------------------------------------- JSD

JSD_SHAPES = [(2, 8, 3200), (3, 5, 1271)]  # Liger: (2, 1024, 3200), (41, 401, 1271)


def peer_jsd(log_q, log_p, beta, label, ignore_index, dtype):
    """Liger's torch JSD, in our words: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q, per token (the
    β = 0 / 1 ends as plain KLs), averaged over non-ignored tokens, cast to ``dtype``."""

    def kl(log_m, log_target):  # KL(target ‖ m) per token
        return F.kl_div(log_m, log_target, reduction="none", log_target=True).sum(-1)

    if beta == 0.0:
        per = kl(log_q, log_p)
    elif beta == 1.0:
        per = kl(log_p, log_q)
    else:
        log_m = torch.lerp(log_q.exp(), log_p.exp(), beta).log()
        per = beta * kl(log_m, log_p) + (1 - beta) * kl(log_m, log_q)
    if label is None:
        return (per / per.shape[0]).sum().to(dtype)
    valid = label != ignore_index
    n_valid = int(valid.sum())
    return (torch.where(valid, per, 0.0) / max(n_valid, 1)).sum().to(dtype)


def jsd_case(B, T, V, dtype, atol, rtol, beta=0.5, ignore_index=None, upstream_scale=1.0, labels=None):
    n = B * T
    x = torch.randn(n, V, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    log_p = torch.randn(n, V, dtype=dtype).log_softmax(-1)
    kw = {}
    if ignore_index is not None:
        if labels is None:
            labels = ignore_some(torch.randint(0, V, (n,)), ignore_index)
        kw = dict(labels=labels, ignore_index=ignore_index)
    # the teacher's log-probabilities, rounded to `dtype`, no longer sum to 1 exactly: ours takes
    # them as logits (renormalised), and so does the peer here
    want = peer_jsd(x1.float().log_softmax(-1), log_p.float().log_softmax(-1), beta, labels,
                    ignore_index if ignore_index is not None else -100, dtype)
    got = swkernels.distill_loss(x2, log_p, "jsd", beta=beta, **kw)
    close(got, want, atol, rtol)
    (want * upstream_scale).backward()
    (got * upstream_scale).backward()
    close(x2.grad, x1.grad, atol, rtol)
    return x, log_p, got


@pytest.mark.parametrize("B,T,V,dtype,atol,rtol,last_layer", div_grid(
    JSD_SHAPES, [(True,), (False,)], quick=lambda dtype, last: dtype[0] == torch.float32 or last[0]))
def test_jsd_correctness_and_symmetry(B, T, V, last_layer, dtype, atol, rtol):
    x, log_p, got = jsd_case(B, T, V, dtype, atol, rtol, upstream_scale=1.0 if last_layer else 2.0)
    close(swkernels.distill_loss(log_p, x.log_softmax(-1), "jsd", beta=0.5), got, atol, rtol)  # β = ½: symmetric


@pytest.mark.parametrize("B,T,V,dtype,atol,rtol,beta", div_grid(
    JSD_SHAPES, [(0.0,), (0.1,), (0.5,), (0.9,), (1.0,)],
    quick=lambda dtype, beta: dtype[0] == torch.float32 or beta[0] == 0.5))
def test_jsd_correctness_with_beta(B, T, V, beta, dtype, atol, rtol):
    jsd_case(B, T, V, dtype, atol, rtol, beta=beta)


@pytest.mark.parametrize("B,T,V,dtype,atol,rtol,ignore_index", div_grid(JSD_SHAPES, [(2,), (42,)]))
def test_jsd_correctness_with_ignore_index(B, T, V, ignore_index, dtype, atol, rtol):
    jsd_case(B, T, V, dtype, atol, rtol, ignore_index=ignore_index)


@pytest.mark.parametrize("B,T,V,dtype,atol,rtol,beta,ignore_index,last_layer", div_grid(
    JSD_SHAPES, [(0.5, 2, False), (0.1, 42, True)]))
def test_jsd_functional(B, T, V, beta, ignore_index, last_layer, dtype, atol, rtol):
    jsd_case(B, T, V, dtype, atol, rtol, beta=beta, ignore_index=ignore_index,
             upstream_scale=1.0 if last_layer else 2.0)


def test_jsd_with_all_indices_ignored():
    labels = torch.full((20,), -100)
    _, _, got = jsd_case(2, 10, 32, torch.bfloat16, 1e-3, 1e-3, ignore_index=-100, labels=labels)
    assert got == 0


# ---------------------------------------------------------------- fused linear JSD

FLJSD_SHAPES = [(2, 8, 128, 512), (2, 9, 167, 1423)]  # Liger: (8, 128, 1024, 4096), (4, 423, 167, 1423)
FLJSD_DTYPES = [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)]


def fljsd_keep(shape, dtype, *_):
    """bf16 LM heads run slowly under the interpreter: the larger shape in fp32 only."""
    return shape == FLJSD_SHAPES[1] or dtype[0] == torch.float32


def peer_lm_head_jsd(x, w, tx, tw, temperature, beta, label=None, ignore_index=-100):
    """Liger's torch LM heads: both linears in their dtype, fp32 logits / T, log-softmax, JSD, cast
    to the heads' dtype."""
    log_q = torch.log_softmax(F.linear(x, w).float() / temperature, dim=-1)
    log_p = torch.log_softmax(F.linear(tx, tw).float() / temperature, dim=-1)
    return peer_jsd(log_q, log_p, beta, label, ignore_index, w.dtype)


def fljsd_case(B, T, H, V, dtype, atol, rtol, temperature, beta, ignore_index=None, labels=None, scalar=1.0,
               autocast=None):
    n = B * T
    w, tw = torch.rand(V, H // 2, dtype=dtype), torch.rand(V, H, dtype=dtype)
    in_dtype = autocast or dtype
    x = torch.rand(n, H // 2, dtype=in_dtype) * scalar
    tx = torch.rand(n, H, dtype=in_dtype) * scalar
    if ignore_index is not None and labels is None:
        labels = ignore_some(torch.randint(0, V, (n,)), ignore_index)
    (x1, w1), (x2, w2) = [(x.clone().requires_grad_(), w.clone().requires_grad_()) for _ in range(2)]
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else torch.enable_grad
    with ctx():
        want = peer_lm_head_jsd(x1, w1, tx, tw, temperature, beta, labels,
                                ignore_index if ignore_index is not None else -100)
        got = swkernels.fused_linear_distill(x2, w2, tx, tw, labels, "jsd", temperature, beta, alpha=1.0,
                                             ignore_index=ignore_index if ignore_index is not None else -100)
        close(got, want, atol, rtol)
        want.backward()
        got.backward()
    close(x2.grad, x1.grad, atol, rtol)
    close(w2.grad, w1.grad, atol, rtol)
    return got, x2.grad


@pytest.mark.parametrize("B,T,H,V,dtype,atol,rtol,temperature,beta", grid(
    FLJSD_SHAPES, FLJSD_DTYPES, [(1.0, 0.5), (2.0, 0.1), (1.0, 0.0), (1.0, 1.0)],  # JSD, T = 2, forward, reverse KL
    quick=lambda shape, dtype, case: shape == FLJSD_SHAPES[1] and (dtype[0] == torch.float32 or case == (1.0, 0.5)),
    keep=fljsd_keep))
def test_fljsd_correctness(B, T, H, V, dtype, atol, rtol, temperature, beta):
    fljsd_case(B, T, H, V, dtype, atol, rtol, temperature, beta)


@pytest.mark.parametrize("B,T,H,V,dtype,atol,rtol,temperature,beta,ignore_index", grid(
    FLJSD_SHAPES, FLJSD_DTYPES, [(1.0, 0.5, 2), (1.0, 0.0, 2), (2.0, 0.1, 42), (1.0, 1.0, 2)],
    quick=lambda shape, dtype, case: dtype[0] == torch.float32, keep=lambda shape, *_: shape == FLJSD_SHAPES[1]))
def test_fljsd_correctness_with_ignore_index(B, T, H, V, dtype, atol, rtol, temperature, beta, ignore_index):
    fljsd_case(B, T, H, V, dtype, atol, rtol, temperature, beta, ignore_index)


@pytest.mark.parametrize("B,T,H,V,dtype,atol,rtol", grid(
    [(2, 2, 8, 8), (9, 7, 41, 41)], FLJSD_DTYPES, quick=lambda shape, dtype: shape[0] == 2))
@pytest.mark.parametrize("temperature,beta,ignore_index", [(1.0, 0.5, -100), (2.0, 0.1, 42)])
def test_fljsd_functional(B, T, H, V, dtype, atol, rtol, temperature, beta, ignore_index):
    fljsd_case(B, T, H, V, dtype, atol, rtol, temperature, beta, ignore_index, scalar=0.5)


@pytest.mark.parametrize("B,T,H,V,dtype,atol,rtol,temperature,beta,ignore_index", grid(
    FLJSD_SHAPES, FLJSD_DTYPES, [(1.0, 0.5, 2), (2.0, 0.1, 42)], keep=lambda shape, *_: shape == FLJSD_SHAPES[1],
    quick=lambda shape, dtype, case: dtype[0] == torch.float32 and case[2] == 2))
def test_fljsd_all_ignored(B, T, H, V, dtype, atol, rtol, temperature, beta, ignore_index):
    labels = torch.full((B * T,), ignore_index)
    got, grad = fljsd_case(B, T, H, V, dtype, atol, rtol, temperature, beta, ignore_index, labels)
    assert got == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, slow(torch.float16)])
def test_fljsd_amp(autocast_dtype):
    # Liger: B=2, T=4, H=2048, V=3200, fp32 heads, inputs in the autocast dtype
    labels = ignore_some(torch.randint(0, 3200, (8,)), -100)
    fljsd_case(2, 4, 256, 3200, torch.float32, 5e-3, 5e-2, 1.0, 0.5, -100, labels, autocast=autocast_dtype)
