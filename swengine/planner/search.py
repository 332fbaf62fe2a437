"""Pick the fastest training setup that fits a GPU, and explain the choice.

Searched: micro-batch, gradient checkpointing, NF4 base weights, 8-bit optimizer (and the LoRA
rank, when the user leaves it open). Gradient accumulation follows from the requested
effective batch. Every candidate's memory comes from the analytic model; its speed from a
simple throughput model (below) that only needs to rank candidates, not predict seconds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from transformers import PretrainedConfig

from swengine.errors import UserError
from swengine.planner.analytic import Estimate, estimate
from swengine.planner.inventory import inventory
from swengine.planner.setup import Setup

GiB = 2**30
RANKS = (8, 16, 32, 64, 128)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
SAFETY_MARGIN = 0.95  # plan to at most 95% of the card, on top of context and allocator slack


@dataclass
class Plan:
    model: str
    gpu: str
    vram_bytes: int
    seq_len: int
    effective_batch: int
    fits: bool
    estimate: Estimate | None  # the chosen setup's estimate (or the smallest one when nothing fits)
    grad_accumulation: int
    tokens_per_second: float | None  # rough, from the GPU's peak and a fixed MFU
    reasons: list[str] = field(default_factory=list)
    minimum_vram_bytes: int | None = None
    max_context: int | None = None

    @property
    def setup(self) -> Setup | None:
        return self.estimate.setup if self.estimate else None


def flops_per_token(config: PretrainedConfig, setup: Setup) -> float:
    """Training FLOPs per token. A frozen base costs a forward (2N) plus the input-gradient half
    of backward (2N); checkpointing repeats the forward (+2N); attention adds 12·L·d·s per token
    for forward+backward (6·L·d·s each way for a causal mask, halved, doubled for recompute)."""
    inv = inventory(config)
    n = inv.num_layers * sum(li.in_features * li.out_features for li in inv.layer_linears)
    n += inv.vocab * inv.hidden  # LM head
    dense = (6 if setup.checkpointing else 4) * n
    attn = 6 * inv.num_layers * inv.q_dim * setup.seq_len * (1.5 if setup.checkpointing else 1.0)
    return dense + attn


def _efficiency(setup: Setup) -> float:
    """Relative speed factors: small matmuls under-use tensor cores; NF4 adds dequantisation."""
    tokens = setup.tokens
    eff = min(1.0, (tokens / 4096) ** 0.25)
    if setup.quant != "none":
        eff *= 0.85
    if setup.optimizer != "adamw":
        eff *= 0.99
    return eff


def tokens_per_second(config: PretrainedConfig, setup: Setup, peak_tflops: float | None, mfu: float = 0.45) -> float:
    peak = (peak_tflops or 100.0) * 1e12
    return peak * mfu * _efficiency(setup) / flops_per_token(config, setup)


def _candidates(base: Setup, rank: int | None, allow_qlora: bool, force_qlora: bool, effective_batch: int):
    ranks = (rank,) if rank else RANKS
    quants = ("nf4-dq",) if force_qlora else (("none", "nf4-dq") if allow_qlora else ("none",))
    micro = [m for m in MICRO_BATCHES if m <= effective_batch]
    for r, q, ck, opt, mb in itertools.product(ranks, quants, (False, True), ("adamw", "adamw8bit"), micro):
        yield base.with_(lora_rank=r, quant=q, checkpointing=ck, optimizer=opt, micro_batch=mb)


def plan(config: PretrainedConfig, model_name: str, *, gpu: str, vram_bytes: int, seq_len: int,
         effective_batch: int = 16, rank: int | None = None, qlora: bool | None = None,
         base: Setup | None = None, peak_tflops: float | None = None) -> Plan:
    """The fastest setup whose total VRAM fits ``SAFETY_MARGIN`` of the card.

    ``qlora``: True forces NF4, False forbids it, None lets the search decide (it prefers bf16
    weights when they fit: faster and exact)."""
    if effective_batch < 1:
        raise UserError(f"effective batch must be >= 1 (got {effective_batch})")
    base = (base or Setup(seq_len=seq_len)).with_(seq_len=seq_len)
    budget = int(vram_bytes * SAFETY_MARGIN)
    fitting: list[tuple[float, Estimate]] = []
    smallest: Estimate | None = None
    for cand in _candidates(base, rank, qlora is not False, qlora is True, effective_batch):
        est = estimate(config, cand, model_name)
        if smallest is None or est.total_vram < smallest.total_vram:
            smallest = est
        if est.total_vram <= budget:
            fitting.append((tokens_per_second(config, cand, peak_tflops), est))
    result = Plan(model=model_name, gpu=gpu, vram_bytes=vram_bytes, seq_len=seq_len, effective_batch=effective_batch,
                  fits=bool(fitting), estimate=None, grad_accumulation=1, tokens_per_second=None)
    if not fitting:
        result.estimate = smallest
        result.minimum_vram_bytes = math.ceil(smallest.total_vram / SAFETY_MARGIN)
        result.reasons.append(
            f"nothing fits in {vram_bytes / GiB:.1f} GiB at seq_len {seq_len}: the smallest setup "
            f"(rank {smallest.setup.lora_rank}, {smallest.setup.quant}, checkpointing, {smallest.setup.optimizer}, "
            f"micro-batch 1) needs {smallest.total_vram / GiB:.2f} GiB, so at least "
            f"{result.minimum_vram_bytes / GiB:.1f} GiB of VRAM; shorten --seq-len or use a bigger GPU")
        return result
    best_speed = max(s for s, _ in fitting)
    # rank barely changes speed: take the largest rank (up to 64 unless asked) within 2% of the best
    near = [(s, e) for s, e in fitting if s >= 0.98 * best_speed]
    cap = rank or 64
    speed, chosen = max(near, key=lambda se: (min(se[1].setup.lora_rank, cap), se[0], -se[1].total_vram))
    result.estimate = chosen
    result.tokens_per_second = speed if peak_tflops else None
    result.grad_accumulation = math.ceil(effective_batch / chosen.setup.micro_batch)
    result.reasons += _explain(chosen, fitting, budget, rank)
    return result


def _explain(chosen: Estimate, fitting: list[tuple[float, Estimate]], budget: int, rank: int | None) -> list[str]:
    s = chosen.setup
    others = [e.setup for _, e in fitting]
    why = []
    if s.quant == "none":
        why.append("bf16 base weights fit, so no NF4 (faster, and exact)")
    elif any(o.quant == "none" for o in others):
        why.append("NF4 base weights leave room for a larger micro-batch, which is faster here")
    else:
        why.append("NF4 (QLoRA) base weights: the bf16 weights do not fit with any setup")
    if not s.checkpointing:
        why.append("no gradient checkpointing: activations fit, saving the recompute (~1/3 of the step)")
    else:
        why.append("gradient checkpointing per decoder layer: without it the activations do not fit")
    why.append(f"micro-batch {s.micro_batch}: the largest that fits and speeds up the step"
               if s.micro_batch > 1 else "micro-batch 1: a larger one does not fit")
    if s.optimizer != "adamw":
        why.append("8-bit AdamW: fp32 optimizer states would not fit")
    why.append(f"LoRA rank {s.lora_rank}" + (" (as requested)" if rank else
                                                " (rank costs little speed; the largest up to 64 that fits)"))
    why.append(f"peak {chosen.total_vram / GiB:.2f} GiB of a {budget / GiB:.2f} GiB budget "
               f"(phase: {chosen.peak_phase})")
    return why


def max_context(config: PretrainedConfig, setup: Setup, vram_bytes: int, limit: int = 1 << 20) -> int:
    """Largest sequence length (micro-batch as in ``setup``) whose step fits the budget; 0 if none."""
    budget = int(vram_bytes * SAFETY_MARGIN)

    def fits(n: int) -> bool:
        return estimate(config, setup.with_(seq_len=n)).total_vram <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
