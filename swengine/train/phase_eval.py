"""The evaluation that ends a context-extension phase: sliding-window perplexity of the eval data
at this phase's length and every earlier phase's (``swengine eval``'s method, fused loss, no full
logits), and the regression check at the previous phase's length."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swengine.data.batches import Row

MAX_WINDOWS = 8  # per length: bounds the cost at 32K while averaging over several windows


@dataclass
class PhaseEval:
    ppl: dict[int, float | None]  # length → perplexity (None: not finite)
    tokens: dict[int, int]  # length → scored tokens
    repeated: bool  # the eval data was shorter than a length and was repeated to fill it


def eval_stream(rows: list[Row]) -> list[int]:
    """The eval rows' real tokens, concatenated (padding and packing fill left out)."""
    return [t for row in rows for t in row.input_ids[:row.real_tokens]]


def perplexities(model, ids: list[int], lengths: list[int], device) -> PhaseEval:
    from swengine.eval.perplexity import fill_to, sliding_window_nll

    was_training = model.training
    model.eval()
    ppl, tokens, repeated = {}, {}, False
    try:
        for length in lengths:
            stream, reps = fill_to(ids, length)
            repeated = repeated or reps > 1
            stream = stream[:length * (MAX_WINDOWS + 1) // 2]  # stride length/2: MAX_WINDOWS windows
            with torch.no_grad():
                result = sliding_window_nll(model, stream, length, max(1, length // 2), device)
            ppl[length], tokens[length] = result.ppl, result.tokens
    finally:
        model.train(was_training)
    return PhaseEval(ppl, tokens, repeated)


def regression(before: float | None, after: float | None) -> float | None:
    """Relative perplexity change at one length between two phases (0.1 = 10% worse)."""
    if before is None or after is None or before <= 0:
        return None
    return after / before - 1.0
