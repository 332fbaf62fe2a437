"""Training rows built on demand from tokenised examples and a compact packing plan.

A plan is the examples in row order (``src``: which store, ``idx``: which example in it) and
``offsets`` (row r holds examples offsets[r]..offsets[r+1]). :class:`LazyRows` is a Sequence of
:class:`~swengine.data.batches.Row` that builds row r only when asked, from the (memory-mapped)
examples, so the rows of a dataset larger than RAM cost a few bytes per example.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from swengine.data.formats import IGNORE


def greedy_plan(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents in order, a new row when the next one does not fit: (order, offsets)."""
    offsets, used = [0], 0
    for k, n in enumerate(memoryview(np.minimum(lengths, seq_len).astype(np.int64))):  # no list of them all
        if used and used + n > seq_len:
            offsets.append(k)
            used = 0
        used += n
    if len(lengths):
        offsets.append(len(lengths))
    return np.arange(len(lengths), dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def best_fit_plan(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: longest documents first, each into the fullest row it still fits;
    rows keep the order they were opened in, documents in a row the order they went in."""
    lengths = np.minimum(lengths, seq_len)
    docs = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted: bisect finds the tightest fit
    for k in docs.tolist():
        n = int(lengths[k])
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, b = free.pop(i)
        else:
            space, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(k)
        bisect.insort(free, (space - n, b))
    order = np.fromiter((k for b in bins for k in b), dtype=np.int64, count=len(lengths))
    offsets = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
    return order, offsets


def single_plan(n: int) -> tuple[np.ndarray, np.ndarray]:
    """One example per row (no packing)."""
    return np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)


def build_row(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int | None):
    """One row from documents (ids, labels), each cut to ``seq_len``. Packed (``pad_id`` set):
    positions restart per document, each document's first label is masked, the row is filled to
    ``seq_len`` with ``pad_id``. Unpacked (``pad_id`` None): one document as it is."""
    from swengine.data.batches import Row

    if pad_id is None:
        ((ids, labels),) = docs
        ids, labels = ids[:seq_len], labels[:seq_len]
        return Row(ids, labels, list(range(len(ids))))
    ids, labels, pos = [], [], []
    for d_ids, d_labels in docs:
        d_ids = d_ids[:seq_len]
        ids += d_ids
        labels += [IGNORE] + d_labels[1:len(d_ids)]
        pos += range(len(d_ids))
    fill = seq_len - len(ids)
    return Row(ids + [pad_id] * fill, labels + [IGNORE] * fill, pos + list(range(fill)), len(ids))


class LazyRows(Sequence):
    """Rows of examples drawn from ``stores`` (each with ``get(i) -> (ids, labels)`` and
    ``lengths``), in plan order; ``pad_id`` None: unpacked rows."""

    def __init__(self, stores: list, src: np.ndarray, idx: np.ndarray, offsets: np.ndarray, seq_len: int,
                 pad_id: int | None):
        self.stores, self.src, self.idx, self.offsets = stores, src, idx, offsets
        self.seq_len, self.pad_id = seq_len, pad_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        docs = [self.stores[s].get(i) for s, i in zip(self.src[a:b].tolist(), self.idx[a:b].tolist(), strict=True)]
        return build_row(docs, self.seq_len, self.pad_id)

    def real_tokens(self) -> int:
        """Tokens that are data (not padding or fill), from the lengths alone."""
        total = 0
        for s, store in enumerate(self.stores):
            total += int(np.minimum(store.lengths[self.idx[self.src == s]], self.seq_len).sum())
        return total

    def padding_ratio(self) -> float:
        """Share of row positions that are packing fill (0 = every position is data)."""
        real = self.real_tokens()
        total = len(self) * self.seq_len if self.pad_id is not None else real
        return 1.0 - real / total if total else 0.0


class ListStore:
    """Examples held in memory (lists of :class:`~swengine.data.formats.Example`), as a store."""

    def __init__(self, examples: list):
        self.examples = examples
        self.lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))

    def get(self, i: int) -> tuple[list[int], list[int]]:
        e = self.examples[i]
        return e.input_ids, e.labels
