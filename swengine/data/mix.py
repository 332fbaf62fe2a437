"""``data.mix``: one training order drawn from several sources by weight.

The order is a pure function of the seed: as many draws as the sources hold examples together,
each draw picking a source with probability proportional to its weight; a source's draws take its
examples in their (seeded) order, and a source drawn more often than it has examples starts over
in a fresh seeded order (sampling with replacement once exhausted). Packed into rows, this order
makes the batch stream's position (saved in every checkpoint) the position in every source too,
so a resumed run continues each source exactly where it stopped.
"""

from __future__ import annotations

import numpy as np


def interleave(sources: list[np.ndarray], weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, idx): for each drawn example, which source and which example of it."""
    w = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    total = sum(len(s) for s in sources)
    src = rng.choice(len(sources), size=total, p=w / w.sum())
    idx = np.zeros(total, dtype=np.int64)
    for s, examples in enumerate(sources):
        wanted = int((src == s).sum())
        passes = [examples]
        while sum(len(p) for p in passes) < wanted:
            passes.append(rng.permutation(examples))
        idx[src == s] = np.concatenate(passes)[:wanted]
    return src.astype(np.int64), idx
