"""Learning-rate schedules: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

from __future__ import annotations

import math

import torch


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:  # LambdaLR calls this with the number of optimizer steps taken
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total, min_ratio))
