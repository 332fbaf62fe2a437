"""Data parallelism under torchrun: the process group and the few collectives the loop needs.

One process per device. ``init`` joins the group torchrun describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK; NCCL on CUDA, gloo on CPU); without torchrun it returns a single-rank
:class:`Dist` whose collectives are no-ops, so the loop has one code path.

Per optimizer step a data-parallel run makes three collectives: the label-token count of the step
(summed before the forward, so every rank divides its token losses by the global count), the
adapter gradients with the step's loss (summed in one flat buffer after the last backward: the
trainable parameters are a few MB, so one bucket beats several), and a max over the ranks of the
control values (a pending signal, the step time, peak memory) that make stop / rollback decisions
identical on every rank. A collective that fails (a rank died: its sockets close; or it did not
answer within ``distributed.timeout_s``) raises :class:`PeerLost` with one line.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch


class PeerLost(RuntimeError):
    """Another rank died or stopped answering: this rank cannot go on."""


def world_size() -> int:
    """The number of ranks torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process was started by torchrun for a group of more than one rank."""
    return world_size() > 1


def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that prints, writes telemetry and checkpoints."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: int = 0
    strategy: str = "ddp"  # fsdp: gradients are reduced by fully_shard (swengine.train.fsdp), not here

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # DistBackendError and gloo's socket errors are RuntimeErrors
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo's [file:line] and advice off
            raise PeerLost(f"rank {self.rank}/{self.world}: {what} failed: another rank died or did not answer "
                           f"within distributed.timeout_s={self.timeout_s} ({first[:200]})") from None

    def _reduce(self, values: list[float], op: str, device: torch.device, what: str) -> list[float]:
        if not self.active:
            return values
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64, device=device)
        self._collective(what, td.all_reduce, t, op=getattr(td.ReduceOp, op))
        return t.tolist()

    def sum(self, values: list[float], device: torch.device, what: str = "summing over the ranks") -> list[float]:
        return self._reduce(values, "SUM", device, what)

    def max(self, values: list[float], device: torch.device, what: str = "agreeing with the ranks") -> list[float]:
        return self._reduce(values, "MAX", device, what)

    def sync_grads(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum every trainable parameter's gradient and the step's loss over the ranks, in one
        flat all-reduce; returns the summed loss. The losses were divided by the global label
        count, so the sums are the gradient and loss of the global batch."""
        if not self.active:
            return loss
        import torch.distributed as td

        if self.strategy == "fsdp":  # fully_shard reduce-scattered the gradients in the backward
            total = loss.detach().reshape(1).float().clone()
            self._collective("the loss all-reduce", td.all_reduce, total, op=td.ReduceOp.SUM)
            return total[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float()])
        self._collective("the gradient all-reduce", td.all_reduce, flat, op=td.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[-1]

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's initial adapter on every rank (seeded alike already; this makes it certain)."""
        if not self.active:
            return
        import torch.distributed as td

        with torch.no_grad():
            for p in params:
                self._collective("broadcasting the adapter", td.broadcast, p.data, src=0)

    def broadcast_object(self, obj, what: str = "waiting for rank 0"):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        self._collective(what, td.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.active:
            import torch.distributed as td

            self._collective(what, td.barrier)

    def close(self) -> None:
        import torch.distributed as td

        if self.active and td.is_initialized():
            td.destroy_process_group()


def check_supported(cfg) -> None:
    """What a run of more than one process does not do yet is refused with one line, not run half-right."""
    from swengine.errors import UserError

    _check_timeout(cfg.distributed.timeout_s)
    if cfg.distributed.strategy == "fsdp":
        from swengine.train import fsdp

        fsdp.check_supported(cfg)
    for key, on in (("context.phases", cfg.context.phases), ("distill.teacher", cfg.distill.teacher),
                    ("distill.cache", cfg.distill.cache)):
        if on:
            raise UserError(f"{key} is not supported with more than one process yet; run it without --nproc / torchrun")


def _check_timeout(timeout_s: int) -> None:
    if timeout_s < 1:
        from swengine.errors import UserError

        raise UserError(f"distributed.timeout_s must be >= 1 second (got {timeout_s})")


def init(timeout_s: int, strategy: str = "ddp") -> Dist:
    """Join torchrun's process group (NCCL when CUDA is available, else gloo), or a single rank."""
    _check_timeout(timeout_s)
    if not launched():
        return Dist(timeout_s=timeout_s, strategy=strategy)
    import torch.distributed as td

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if rank:  # only rank 0 speaks: no loading progress bars from the others
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return Dist(rank, world, local, timeout_s, strategy)


class QuietMetrics:
    """Telemetry on ranks other than 0: events are built (the breaker reads them) but not written."""

    def __init__(self, rank: int):
        self.rank, self.phase = rank, None

    def log(self, event: str, **fields) -> dict:
        return {"event": event, "rank": self.rank, **fields}

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class NoLock:
    """Ranks other than 0 hold no lock on the output directory: rank 0's lock is the run's."""

    def release(self) -> None:
        pass
