"""Live tensor-memory accounting that works on real and on fake tensors.

:class:`LiveBytes` is a TorchDispatchMode that adds the bytes of every *new* storage an op
returns (rounded up to the CUDA caching allocator's 512 B granularity) and subtracts them when
the storage dies, keeping the peak and the phase it happened in. Under FakeTensorMode nothing is
really allocated, so the peak of a full training step of an 8B model can be measured on a CPU;
the same code on real CPU tensors gives the real number, which is how fake impls are tested.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GRANULARITY = 512


def _rounded(nbytes: int) -> int:
    return -(-nbytes // GRANULARITY) * GRANULARITY


class LiveBytes(TorchDispatchMode):
    """Track live bytes allocated by ops run inside the mode; ``peak`` is the high-water mark.

    Storages that existed before the mode (weights, inputs) are not counted unless
    :meth:`count` is called on them. Set ``phase`` to label where the peak happens.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._phase = "start"
        self.peak_phase = "start"
        self.phase_peaks: dict[str, int] = {}
        self._live: dict[int, int] = {}

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        """Label what runs next; ``phase_peaks[name]`` keeps the highest live bytes seen under it."""
        self._phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)

    def count(self, *tensors: torch.Tensor) -> None:
        """Count already-existing tensors (e.g. parameters) as live from now on."""
        for t in tensors:
            self._add(t.untyped_storage())

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._live:
            return
        n = _rounded(storage.nbytes())
        self._live[key] = n
        self.current += n
        if self.current > self.phase_peaks.get(self._phase, 0):
            self.phase_peaks[self._phase] = self.current
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self._phase
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak, self.peak_phase = self.current, self._phase
        self.phase_peaks = {self._phase: self.current}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in inputs:
                    self._add(st)
        return out
