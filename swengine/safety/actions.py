"""Carrying out a breaker action on the optimizer: duck-typed (any torch optimizer and LR
scheduler with ``base_lrs``), so this module imports no torch."""

from __future__ import annotations


def scale_lr(optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate by ``factor`` now and for the rest of the schedule: every param
    group's ``lr`` (and ``initial_lr``) and the scheduler's ``base_lrs``, which its lambda scales
    at each step and which its state_dict saves, so a checkpoint keeps the lowered LR."""
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
