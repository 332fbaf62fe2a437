"""Rows of tokens (packed or padded) and a deterministic, resumable batch stream.

Packing concatenates examples into rows of exactly ``seq_len`` tokens; position_ids restart at 0
for each document (our attention keeps documents apart) and each document's first label is
masked, so no token is trained to predict across a document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from swengine.data.formats import IGNORE, Example


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    real: int | None = None  # tokens that are data, not packing fill (None: all of them)

    @property
    def real_tokens(self) -> int:
        return len(self.input_ids) if self.real is None else self.real


def _rows(examples: list[Example], plan, seq_len: int, pad_id: int | None) -> list[Row]:
    from swengine.data.rows import LazyRows, ListStore

    order, offsets = plan
    return list(LazyRows([ListStore(examples)], np.zeros(len(order), dtype=np.int64), order, offsets, seq_len, pad_id))


def pack(examples: list[Example], seq_len: int, pad_id: int) -> list[Row]:
    """Documents in order into rows of ``seq_len``, a new row when the next one does not fit."""
    from swengine.data.rows import ListStore, greedy_plan

    return _rows(examples, greedy_plan(ListStore(examples).lengths, seq_len), seq_len, pad_id)


def pack_best_fit(examples: list[Example], seq_len: int, pad_id: int) -> list[Row]:
    """Best-fit decreasing: longest documents first, each into the fullest row it still fits
    (fewer rows, less padding than packing in order). Positions restart per document, as in
    :func:`pack`; rows keep the order they were opened in."""
    from swengine.data.rows import ListStore, best_fit_plan

    return _rows(examples, best_fit_plan(ListStore(examples).lengths, seq_len), seq_len, pad_id)


def padding_ratio(rows: list[Row]) -> float:
    """Share of row positions that are padding or packing fill (0 = every position is data)."""
    if hasattr(rows, "padding_ratio"):  # LazyRows: from the plan's lengths, without building a row
        return rows.padding_ratio()
    total = sum(len(r.input_ids) for r in rows)
    return 1.0 - sum(r.real_tokens for r in rows) / total if total else 0.0


def unpacked(examples: list[Example], seq_len: int) -> list[Row]:
    from swengine.data.rows import single_plan

    return _rows(examples, single_plan(len(examples)), seq_len, None)


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (causal attention never looks right, so no mask is needed).
    ``real_tokens`` (a CPU scalar) counts the tokens that are data, for throughput figures."""
    n = max(len(r.input_ids) for r in rows)
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        fill = n - len(r.input_ids)
        out["input_ids"].append(r.input_ids + [pad_id] * fill)
        out["labels"].append(r.labels + [IGNORE] * fill)
        out["position_ids"].append(r.position_ids + list(range(len(r.position_ids), len(r.position_ids) + fill)))
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    batch["real_tokens"] = torch.tensor(sum(r.real_tokens for r in rows))
    return batch


class BatchStream:
    """Micro-batches in a seeded order that is reshuffled every epoch; its position (epoch, index)
    is part of a checkpoint, so a resumed run sees exactly the batches it would have seen.

    Data parallel (``world`` ranks): each ``next()`` moves the one global sequence of micro-batches
    on by ``world`` (``micro_batch × world`` rows) and rank ``r`` takes the r-th of them, so the ranks
    together see exactly the micro-batches one process would, epoch boundaries included. The
    position stays global, so a checkpoint resumes under any number of ranks."""

    def __init__(self, rows: list[Row], micro_batch: int, seed: int, pad_id: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        if not rows:
            raise ValueError("no training rows")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.rows, self.micro_batch, self.seed, self.pad_id, self.shuffle = rows, micro_batch, seed, pad_id, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank."""
        micro_batches = -(-len(self.rows) // self.micro_batch)  # of the global sequence
        return -(-micro_batches // self.world)

    def _advance(self) -> list[int]:
        """The next micro-batch of the global sequence (indices into rows)."""
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._permutation(self.epoch)
        picked = self._order[self.index:self.index + self.micro_batch]
        self.index += self.micro_batch
        return picked

    def next(self) -> dict[str, torch.Tensor]:
        for r in range(self.world):
            picked = self._advance()
            if r == self.rank:
                self.last_rows = picked  # indices into rows
        return collate([self.rows[i] for i in self.last_rows], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def eval_batches(rows: list[Row], micro_batch: int, pad_id: int):
    for i in range(0, len(rows), micro_batch):
        yield collate(rows[i:i + micro_batch], pad_id)
