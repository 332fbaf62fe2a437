"""Context extension in phases: the training length grows phase by phase (e.g. 4K → 8K → 16K →
32K) under one RoPE scaling for the target length (``context.rope_scaling``). Each phase has its
own steps (or token budget), LR warmup and decay, and its own micro-batch / accumulation /
checkpointing (the planner's for that length with ``--auto``; the user's explicit values win).
A run without ``context.phases`` is one phase at ``data.max_seq_len``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from swengine.config import TrainConfig
from swengine.errors import UserError


@dataclass
class Phase:
    index: int  # 1-based
    seq_len: int
    steps: int
    micro_batch: int
    grad_accumulation: int
    checkpointing: bool
    tokens: int = 0  # the token budget it was sized from (0: sized in steps)

    @property
    def name(self) -> str:
        return f"phase-{self.index}"


@dataclass(frozen=True)
class PhaseSetup:
    """What the planner chooses for one length (None: keep the config's)."""

    micro_batch: int
    grad_accumulation: int
    checkpointing: bool


def doubling_phases(native: int, target: int) -> list[int]:
    """``--context T`` without explicit phases: double the model's window until T (e.g. 8K → 32K:
    16K, 32K)."""
    if target <= native:
        raise UserError(f"--context {target} is not beyond the model's {native} positions; context extension needs "
                        f"a longer target (e.g. --context {native * 4})")
    lengths, length = [], native
    while length < target:
        length = min(length * 2, target)
        lengths.append(length)
    return lengths


def _per_phase(values: list[int], n: int, key: str) -> list[int]:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"{key} has {len(values)} values for {n} context.phases; give one per phase or a single "
                        "value for all")
    return list(values)


def resolve(cfg: TrainConfig, explicit: set[str] | frozenset = frozenset(),
            plan_for: Callable[[int], PhaseSetup] | None = None) -> list[Phase]:
    """The phases of a run. ``plan_for(seq_len)`` (with --auto) sizes each phase; keys in
    ``explicit`` (what the user wrote) are never replaced by the planner's choice."""
    c, s = cfg.context, cfg.schedule
    if not c.phases and (c.phase_steps or c.phase_tokens):
        raise UserError("context.phase_steps / context.phase_tokens need context.phases (or --context N)")
    lengths = list(c.phases) or [cfg.data.max_seq_len]
    n = len(lengths)
    phases = []
    for i, length in enumerate(lengths):
        setup = plan_for(length) if plan_for is not None else None
        micro = s.micro_batch_size if setup is None or "schedule.micro_batch_size" in explicit else setup.micro_batch
        accum = (s.grad_accumulation if setup is None or "schedule.grad_accumulation" in explicit
                 else setup.grad_accumulation)
        ckpt = (cfg.checkpointing.gradient_checkpointing
                if setup is None or "checkpointing.gradient_checkpointing" in explicit else setup.checkpointing)
        phases.append(Phase(i + 1, length, 0, micro, accum, ckpt))
    if c.phase_tokens:
        for phase, tokens in zip(phases, _per_phase(c.phase_tokens, n, "context.phase_tokens"), strict=True):
            phase.tokens = tokens
            phase.steps = max(1, math.ceil(tokens / (phase.micro_batch * phase.grad_accumulation * phase.seq_len)))
    elif c.phase_steps:
        for phase, steps in zip(phases, _per_phase(c.phase_steps, n, "context.phase_steps"), strict=True):
            phase.steps = steps
    elif c.phases and s.epochs > 0:
        raise UserError("schedule.epochs does not apply to context.phases; size the phases with context.phase_steps "
                        "or context.phase_tokens")
    return phases


def with_steps(phases: list[Phase], default_steps: int) -> list[Phase]:
    """Phases sized neither by steps nor tokens take ``default_steps`` (schedule.max_steps, or the
    epochs' steps of a single-phase run)."""
    for phase in phases:
        if phase.steps == 0:
            phase.steps = default_steps
    return phases


def index_at(phases: list[Phase], step: int) -> int:
    """The 0-based index of the phase that optimizer step ``step`` (0-based, global) belongs to."""
    end = 0
    for i, phase in enumerate(phases):
        end += phase.steps
        if step < end:
            return i
    return len(phases) - 1


def start_of(phases: list[Phase], index: int) -> int:
    return sum(p.steps for p in phases[:index])


def describe(phases: list[Phase]) -> str:
    return "; ".join(f"{p.name}: {p.seq_len} tokens × {p.steps} steps (micro-batch {p.micro_batch} × "
                     f"accumulation {p.grad_accumulation}, checkpointing {'on' if p.checkpointing else 'off'})"
                     for p in phases)
