"""Sliding-window perplexity (Hugging Face's "perplexity of fixed-length models").

The evaluation text is one token stream: every record of the data file as the trainer would
tokenize it (bos + text + eos, chat template for conversations; every token counts), concatenated.
At a length L the model sees windows of ``window`` (default L) tokens starting every ``stride``
(default window / 2) tokens; each window scores only the tokens no earlier window scored, so
every token after the first is scored exactly once, with between window − stride and window − 1
tokens of context (all before it in the first window). With stride = window the windows are
disjoint and each window's first token has no context, so it is not scored.

The loss is :func:`swkernels.fused_linear_cross_entropy` (sum) on the final hidden states and the
LM head's weight: the (tokens × vocab) logits are never materialised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swengine.errors import UserError
from swengine.eval.forward import final_hidden, output_head


@dataclass(frozen=True)
class Window:
    begin: int  # the model sees ids[begin:end]
    end: int
    first: int  # and is scored on predicting ids[first:end]


@dataclass
class Stream:
    ids: list[int]
    path: str
    format: str
    documents: int


def token_stream(path: str, tokenizer, text_field: str = "text", max_tokens: int | None = None) -> Stream:
    """The records of a .jsonl/.json/.parquet/.txt file, tokenized and concatenated (at most
    ``max_tokens`` of them)."""
    from swengine.data.formats import check_fields, detect_format, to_example
    from swengine.data.records import read_records_located

    records, where = read_records_located(path)
    fmt = detect_format(records[0], "auto", text_field)
    check_fields(records, fmt, path, text_field, where)
    ids: list[int] = []
    for record in records:
        ids += to_example(record, fmt, tokenizer, train_on_prompt=True, text_field=text_field).input_ids
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    if len(ids) < 2:
        raise UserError(f"{path} tokenizes to {len(ids)} token(s): too little to fill even one window (perplexity "
                        "needs at least 2 tokens); pass a larger --data file")
    return Stream(ids, path, fmt, len(records))


def fill_to(ids: list[int], length: int) -> tuple[list[int], float]:
    """``ids`` when it holds at least ``length`` tokens, else the stream repeated and cut to
    ``length`` tokens; with how many times the data was used (1.0 = not repeated)."""
    if len(ids) >= length:
        return ids, 1.0
    reps = math.ceil(length / len(ids))
    return (ids * reps)[:length], length / len(ids)


def plan_windows(n: int, window: int, stride: int) -> list[Window]:
    """The windows over an n-token stream; token t (1 ≤ t < n) is scored by exactly one window
    (tokens at a window's start are skipped when stride = window)."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    windows, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end >= n:
            return windows
        begin += stride


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens: int
    windows: int
    seconds: float

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float | None:
        """exp(mean NLL); None where the NLL is not finite or exp would overflow."""
        if not math.isfinite(self.nll) or self.nll > 700:  # exp overflows a float past ~709.8
            return None
        return math.exp(self.nll)


@torch.inference_mode()
def sliding_window_nll(model, ids: list[int], window: int, stride: int, device: torch.device | str = "cpu",
                       progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Summed next-token NLL over the stream ``ids`` with sliding windows (see the module doc)."""
    import swkernels

    start = time.perf_counter()
    head, softcap = output_head(model)
    stream = torch.tensor(ids, dtype=torch.long)
    plan = plan_windows(len(ids), window, stride)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for i, w in enumerate(plan):
        hidden = final_hidden(model, stream[w.begin:w.end].to(device)[None])[0]
        rows = hidden[w.first - 1 - w.begin:w.end - 1 - w.begin]  # position p predicts token p + 1
        labels = stream[w.first:w.end].to(device)
        total += swkernels.fused_linear_cross_entropy(rows, head.weight, labels, softcap=softcap, bias=head.bias,
                                                      reduction="sum").double()
        tokens += w.end - w.first
        if progress is not None:
            progress(i + 1, len(plan))
    return PerplexityResult(float(total), tokens, len(plan), time.perf_counter() - start)
