"""Optimizers the loop supports: torch AdamW (fused where the device has it) and bitsandbytes 8-bit AdamW."""

from __future__ import annotations

import torch

from swengine.errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def build_optimizer(params: list[torch.nn.Parameter], name: str = "adamw", *, lr: float = 2e-4,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW keeps two fp32 states per trainable parameter (8 B/param); the bitsandbytes 8-bit
    variants keep two blockwise-quantised uint8 states (~2 B/param), paged ones in unified memory."""
    if name == "adamw":
        # fused=True: one kernel for all params, no foreach temporaries (CUDA and CPU both have it)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=True)
    if name in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
