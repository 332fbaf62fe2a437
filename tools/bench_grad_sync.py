"""Adapter-gradient sync under torchrun on CPU/gloo: PyTorch's DistributedDataParallel (trainable
parameters only, ``no_sync`` over the accumulated micro-batches) against the one flat all-reduce
that ``swengine.train.distributed.Dist.sync_grads`` does. A stack of frozen linears with low-rank
adapters stands in for a LoRA model; ms per optimizer step, after 3 warm-up steps.

    OMP_NUM_THREADS=1 H=1024 L=16 R=64 torchrun --standalone --nproc-per-node 2 tools/bench_grad_sync.py
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

from swengine.train.distributed import Dist

H, L, R = (int(os.environ.get(k, d)) for k, d in (("H", 512), ("L", 8), ("R", 16)))
ACCUM, STEPS, WARMUP = 2, 20, 3


class LowRank(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(H, H, bias=False).requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(R, H) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(H, R))

    def forward(self, x):
        return torch.tanh(self.base(x) + x @ self.a.T @ self.b.T)


def step_ms(mode: str, dist: Dist, x: torch.Tensor) -> tuple[float, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[LowRank() for _ in range(L)])
    params = [p for p in model.parameters() if p.requires_grad]
    forward = DistributedDataParallel(model) if mode == "ddp" else model
    opt = torch.optim.AdamW(params, lr=1e-3)
    for i in range(STEPS + WARMUP):
        if i == WARMUP:
            td.barrier()
            start = time.perf_counter()
        for a in range(ACCUM):
            quiet = mode == "ddp" and a < ACCUM - 1
            with forward.no_sync() if quiet else contextlib.nullcontext():
                loss = forward(x).pow(2).mean()
                loss.backward()
        if mode == "flat":
            dist.sync_grads(params, loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
    td.barrier()
    return 1000 * (time.perf_counter() - start) / STEPS, sum(p.numel() for p in params)


def main() -> None:
    td.init_process_group("gloo")
    dist = Dist(td.get_rank(), td.get_world_size())
    x = torch.randn(8, 64, H)
    for mode in ("ddp", "flat", "ddp", "flat"):
        ms, n = step_ms(mode, dist, x)
        if dist.main:
            print(f"{mode}: {n / 1e6:.2f}M adapter parameters, {ms:.1f} ms/step")
    td.destroy_process_group()


if __name__ == "__main__":
    main()
