"""Pick the fastest training setup that fits a GPU, and explain the choice.

Searched: micro-batch, gradient checkpointing, NF4 base weights, 8-bit optimizer (and the LoRA
rank, when the user leaves it open). Gradient accumulation follows from the requested
effective batch. Every candidate's memory comes from the analytic model, its speed from the
speed model (:mod:`swengine.planner.speed`: fitted to measured steps where the GPU's
architecture has been measured, else derived from its published figures). Without measurements
bf16 base weights win whenever they fit (exact, and no dequantisation to mis-estimate); with
them, the predicted speed decides. ``prefer="memory"`` takes the smallest peak instead.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from transformers import PretrainedConfig

from swengine.errors import UserError
from swengine.planner.analytic import Estimate, estimate
from swengine.planner.setup import Setup
from swengine.planner.speed import SpeedModel, generic

GiB = 2**30
PREFERENCES = ("speed", "memory")
RANKS = (8, 16, 32, 64, 128)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
RANK_SPEED_TOLERANCE = 0.9  # a larger LoRA rank may cost up to 10% of the fastest setup's speed
SAFETY_MARGIN = 0.95  # plan to at most 95% of the card, on top of context and allocator slack


@dataclass
class Alternative:
    """A fitting setup the plan did not choose, the best of its kind (base weights, checkpointing,
    optimizer), and why."""

    estimate: Estimate
    grad_accumulation: int
    tokens_per_second: float
    why_not: str


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
    tokens_per_second: float | None  # the speed model's prediction for the chosen setup
    reasons: list[str] = field(default_factory=list)
    minimum_vram_bytes: int | None = None
    max_context: int | None = None
    prefer: str = "speed"
    speed_source: str = ""  # where the speed model's coefficients come from
    alternatives: list[Alternative] = field(default_factory=list)

    @property
    def setup(self) -> Setup | None:
        return self.estimate.setup if self.estimate else None


def _candidates(base: Setup, rank: int | None, allow_qlora: bool, force_qlora: bool, effective_batch: int,
                fixed: dict):
    """Every setup the search weighs. ``fixed`` (Setup field → value: quant, checkpointing,
    optimizer, micro_batch) pins what the user chose; the search varies the rest."""
    ranks = (rank,) if rank else RANKS
    quants = ("nf4-dq",) if force_qlora else (("none", "nf4-dq") if allow_qlora else ("none",))
    options = {"quant": quants, "checkpointing": (False, True), "optimizer": ("adamw", "adamw8bit"),
               "micro_batch": [m for m in MICRO_BATCHES if m <= effective_batch]}
    unknown = set(fixed) - set(options)
    if unknown:
        raise ValueError(f"cannot pin {sorted(unknown)}; pin one of {sorted(options)}")
    for key, value in fixed.items():
        options[key] = (value,)
    for r, q, ck, opt, mb in itertools.product(ranks, *options.values()):
        yield base.with_(lora_rank=r, quant=q, checkpointing=ck, optimizer=opt, micro_batch=mb)


@dataclass
class _Scored:
    estimate: Estimate
    grad_accumulation: int
    tokens_per_second: float

    @property
    def setup(self) -> Setup:
        return self.estimate.setup


def plan(config: PretrainedConfig, model_name: str, *, gpu: str, vram_bytes: int, seq_len: int,
         effective_batch: int = 16, rank: int | None = None, qlora: bool | None = None,
         base: Setup | None = None, speed: SpeedModel | None = None, prefer: str = "speed",
         alternatives: int = 3, fixed: dict | None = None) -> Plan:
    """The fastest (``prefer="memory"``: the smallest) setup whose total VRAM fits
    ``SAFETY_MARGIN`` of the card, and the best ``alternatives`` of other kinds.

    ``qlora``: True forces NF4, False forbids it, None lets the search decide. ``speed``: the speed
    model (default: generic coefficients of an unknown GPU). ``fixed``: fields of the setup the
    user chose (``--auto`` keeps them), see :func:`_candidates`."""
    if effective_batch < 1:
        raise UserError(f"effective batch must be >= 1 (got {effective_batch})")
    if prefer not in PREFERENCES:
        raise UserError(f"--prefer must be one of: {', '.join(PREFERENCES)} (got {prefer!r})")
    base = (base or Setup(seq_len=seq_len)).with_(seq_len=seq_len)
    speed = speed or generic(None, base.lora_impl)
    budget = int(vram_bytes * SAFETY_MARGIN)
    fitting: list[_Scored] = []
    smallest: Estimate | None = None
    fixed = dict(fixed or {})
    for cand in _candidates(base, rank, qlora is not False, qlora is True, effective_batch, fixed):
        est = estimate(config, cand, model_name)
        if smallest is None or est.total_vram < smallest.total_vram:
            smallest = est
        if est.total_vram <= budget:
            accum = math.ceil(effective_batch / cand.micro_batch)
            fitting.append(_Scored(est, accum, speed.tokens_per_second(config, cand, accum)))
    result = Plan(model=model_name, gpu=gpu, vram_bytes=vram_bytes, seq_len=seq_len, effective_batch=effective_batch,
                  fits=bool(fitting), estimate=None, grad_accumulation=1, tokens_per_second=None, prefer=prefer,
                  speed_source=speed.source)
    if not fitting:
        result.estimate = smallest
        result.minimum_vram_bytes = math.ceil(smallest.total_vram / SAFETY_MARGIN)
        pinned = ", ".join(f"{k}={v}" for k, v in fixed.items())
        result.reasons.append(
            f"nothing fits in {vram_bytes / GiB:.1f} GiB at seq_len {seq_len} with {pinned}: the smallest such "
            f"setup needs {smallest.total_vram / GiB:.2f} GiB" if fixed else
            f"nothing fits in {vram_bytes / GiB:.1f} GiB at seq_len {seq_len}: the smallest setup "
            f"(rank {smallest.setup.lora_rank}, {smallest.setup.quant}, checkpointing, {smallest.setup.optimizer}, "
            f"micro-batch 1) needs {smallest.total_vram / GiB:.2f} GiB, so at least "
            f"{result.minimum_vram_bytes / GiB:.1f} GiB of VRAM; shorten --seq-len or use a bigger GPU")
        return result
    pool = fitting
    bf16_fits = any(c.setup.quant == "none" for c in fitting)
    if prefer == "speed" and not speed.measured and bf16_fits:
        pool = [c for c in fitting if c.setup.quant == "none"]  # no measurement says NF4 is faster
    chosen = _best(pool, prefer, rank)
    result.estimate = chosen.estimate
    result.tokens_per_second = chosen.tokens_per_second
    result.grad_accumulation = chosen.grad_accumulation
    result.alternatives = _alternatives(fitting, chosen, prefer, rank, speed, alternatives)
    result.reasons += _explain(chosen, fitting, budget, rank, prefer, speed, fixed)
    return result


def _best(pool: list[_Scored], prefer: str, rank: int | None) -> _Scored:
    """The rank first (a quality choice): the largest up to 64 (or the one asked for) whose best
    setup is within RANK_SPEED_TOLERANCE of the fastest. Then, at that rank, speed: the fastest,
    exact fp32 AdamW among equals, then the smaller peak; memory: the smallest peak (within 2%),
    then the fastest."""
    cap = rank or 64
    fastest = max(c.tokens_per_second for c in pool)
    ranks = {c.setup.lora_rank for c in pool if c.tokens_per_second >= RANK_SPEED_TOLERANCE * fastest}
    r = max(ranks, key=lambda x: (min(x, cap), -abs(x - cap)))
    same_rank = [c for c in pool if c.setup.lora_rank == r]
    if prefer == "speed":
        return max(same_rank, key=lambda c: (c.tokens_per_second, c.setup.optimizer == "adamw",
                                             -c.estimate.total_vram))
    least = min(c.estimate.total_vram for c in same_rank)
    return max((c for c in same_rank if c.estimate.total_vram <= 1.02 * least), key=lambda c: c.tokens_per_second)


def _kind(s: Setup) -> tuple:
    return s.quant != "none", s.checkpointing, s.optimizer


def _alternatives(fitting: list[_Scored], chosen: _Scored, prefer: str, rank: int | None, speed: SpeedModel,
                  n: int) -> list[Alternative]:
    """The best setup of every other kind (base weights × checkpointing × optimizer), at the chosen
    rank where that kind has it, ordered as the preference orders them."""
    groups: dict[tuple, list[_Scored]] = {}
    for c in fitting:
        if _kind(c.setup) != _kind(chosen.setup) and c.setup.lora_rank == chosen.setup.lora_rank:
            groups.setdefault(_kind(c.setup), []).append(c)
    best = [_best(g, prefer, rank) for g in groups.values()]
    if prefer == "speed":
        best.sort(key=lambda c: -c.tokens_per_second)
    else:
        best.sort(key=lambda c: c.estimate.total_vram)
    out = []
    for c in best[:n]:
        out.append(Alternative(c.estimate, c.grad_accumulation, c.tokens_per_second,
                               _why_not(c, chosen, prefer, speed)))
    return out


def _why_not(c: _Scored, chosen: _Scored, prefer: str, speed: SpeedModel) -> str:
    gib = (c.estimate.total_vram - chosen.estimate.total_vram) / GiB
    pct = 100 * (1 - c.tokens_per_second / chosen.tokens_per_second)
    if prefer == "memory" and gib > 0:
        return f"needs {gib:.2f} GiB more"
    if c.setup.quant != "none" and chosen.setup.quant == "none" and pct < 0 and not speed.measured:
        return (f"predicted {-pct:.0f}% faster only by unmeasured coefficients; bf16 base weights fit, are exact, "
                "and win until measured steps on this GPU architecture say otherwise")
    if pct >= 0.5:
        return f"{pct:.0f}% slower" + (f", and needs {gib:.2f} GiB more" if gib > 0 else "")
    if pct > -0.5:  # a tie on speed: say what broke it
        if c.setup.quant != "none" and chosen.setup.quant == "none":
            return "as fast; bf16 base weights are exact"
        if c.setup.optimizer != "adamw" and chosen.setup.optimizer == "adamw":
            return "as fast; 8-bit optimizer states are an approximation"
        return f"as fast, needs {gib:.2f} GiB more" if gib > 0 else "as fast"
    return f"{-pct:.0f}% faster, but needs {gib:.2f} GiB more" if gib > 0 else f"{-pct:.0f}% faster"


def _explain(chosen: _Scored, fitting: list[_Scored], budget: int, rank: int | None, prefer: str,
             speed: SpeedModel, fixed: dict) -> list[str]:
    s = chosen.setup
    bf16 = [c for c in fitting if c.setup.quant == "none"]
    why = []
    if "quant" in fixed:
        why.append(f"{'bf16' if s.quant == 'none' else s.quant} base weights (as you set)")
    elif s.quant == "none":
        why.append("bf16 base weights fit, so no NF4 (exact, and no dequantisation)")
    elif bf16 and prefer == "memory":
        why.append("NF4 base weights: the smallest peak (--prefer memory)")
    elif bf16:
        fastest_bf16 = max(c.tokens_per_second for c in bf16)
        why.append(f"NF4 base weights: the measured speed model predicts {chosen.tokens_per_second:,.0f} tokens/s, "
                   f"against {fastest_bf16:,.0f} for the fastest bf16 setup that fits")
    else:
        why.append("NF4 (QLoRA) base weights: the bf16 weights do not fit with any setup")
    if prefer == "memory":
        why.append("--prefer memory: the smallest peak at this rank, the fastest among equals")
    if "checkpointing" in fixed:
        why.append(f"gradient checkpointing {'on' if s.checkpointing else 'off'} (as you set)")
    elif not s.checkpointing:
        why.append("no gradient checkpointing: activations fit, saving the recompute (~1/3 of the step)")
    elif any(not c.setup.checkpointing and c.setup.quant == s.quant for c in fitting) and prefer == "speed":
        why.append("gradient checkpointing per decoder layer: it frees room for a larger micro-batch, faster here")
    elif prefer == "speed":
        why.append("gradient checkpointing per decoder layer: without it the activations do not fit")
    if "micro_batch" in fixed:
        why.append(f"micro-batch {s.micro_batch} (as you set)")
    elif s.micro_batch > 1:
        why.append(f"micro-batch {s.micro_batch}" + (": the fastest that fits" if prefer == "speed" else ""))
    else:
        why.append("micro-batch 1" + (": a larger one does not fit or is not faster" if prefer == "speed" else ""))
    if "optimizer" in fixed:
        why.append(f"optimizer {s.optimizer} (as you set)")
    elif s.optimizer != "adamw":
        why.append("8-bit AdamW: fp32 optimizer states would not fit" if prefer == "speed"
                   else "8-bit AdamW: a quarter of the optimizer-state bytes")
    why.append(f"LoRA rank {s.lora_rank}" + (" (as requested)" if rank else
                                                " (a quality choice: the largest up to 64 within 10% of the fastest setup's speed)"))
    why.append(f"peak {chosen.estimate.total_vram / GiB:.2f} GiB of a {budget / GiB:.2f} GiB budget "
               f"(phase: {chosen.estimate.peak_phase})")
    why.append(f"speed model: {speed.source}")
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
