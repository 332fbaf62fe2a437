"""Sliding-window perplexity (Hugging Face's "perplexity of fixed-length models").

The evaluation text is one token stream: every record of the data file tokenized as the trainer
tokenizes it (bos + text + eos; the chat template for conversations), concatenated. Which tokens
count is what training learns from: every token of text data; only completions / assistant turns
of instruction data, unless ``all_tokens`` (the run's ``data.train_on_prompt``, or
``--all-tokens``) scores prompts too.

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
    targets: list[bool]  # whether predicting this token counts (never the first: nothing precedes it)
    path: str
    format: str
    documents: int  # records used (all, or those that --max-tokens reached into)

    @property
    def scored(self) -> int:
        return sum(self.targets[1:])


def token_stream(path: str, tokenizer, text_field: str = "text", max_tokens: int | None = None,
                 all_tokens: bool = False) -> Stream:
    """The records of a .jsonl/.json/.parquet/.txt file, tokenized and concatenated (at most
    ``max_tokens`` tokens), with which tokens count (see the module doc)."""
    from swengine.data.formats import IGNORE, check_fields, detect_format, to_example
    from swengine.data.records import read_records_located

    records, where = read_records_located(path)
    fmt = detect_format(records[0], "auto", text_field)
    check_fields(records, fmt, path, text_field, where)
    ids: list[int] = []
    targets: list[bool] = []
    used = 0
    for record in records:
        ex = to_example(record, fmt, tokenizer, train_on_prompt=all_tokens, text_field=text_field)
        ids += ex.input_ids
        targets += [label != IGNORE for label in ex.labels]
        used += 1
        if max_tokens is not None and len(ids) >= max_tokens:
            ids, targets = ids[:max_tokens], targets[:max_tokens]
            break
    stream = Stream(ids, targets, path, fmt, used)
    if len(ids) < 2 or not stream.scored:
        what = f"{len(ids)} token(s)" if len(ids) < 2 else f"{len(ids)} tokens, none of them a completion to score"
        raise UserError(f"{path} tokenizes to {what}: too little to fill even one window; pass a larger --data file"
                        + ("" if len(ids) < 2 else " (or --all-tokens to score prompts too)"))
    return stream


def fill_to(items: list, length: int) -> tuple[list, float]:
    """``items`` when it holds at least ``length`` of them, else repeated and cut to ``length``;
    with how many times the data was used (1.0 = not repeated)."""
    if len(items) >= length:
        return items, 1.0
    reps = math.ceil(length / len(items))
    return (items * reps)[:length], length / len(items)


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
        """Mean NLL per scored token (nan when no token was scored)."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float | None:
        """exp(mean NLL); None where the NLL is not finite or exp would overflow."""
        if not math.isfinite(self.nll) or self.nll > 700:  # exp overflows a float past ~709.8
            return None
        return math.exp(self.nll)


@torch.inference_mode()
def sliding_window_nll(model, ids: list[int], window: int, stride: int, device: torch.device | str = "cpu",
                       progress: Callable[[int, int], None] | None = None,
                       targets: list[bool] | None = None) -> PerplexityResult:
    """Summed next-token NLL over the stream ``ids`` with sliding windows (see the module doc);
    ``targets`` (default: all) says which tokens count."""
    import swkernels
    from swengine.data.formats import IGNORE

    start = time.perf_counter()
    head, softcap = output_head(model)
    stream = torch.tensor(ids, dtype=torch.long)
    if targets is not None:
        stream_labels = torch.where(torch.tensor(targets, dtype=torch.bool), stream, IGNORE)
    else:
        stream_labels = stream
    plan = plan_windows(len(ids), window, stride)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for i, w in enumerate(plan):
        labels = stream_labels[w.first:w.end]
        n = int((labels != IGNORE).sum())
        if n:
            hidden = final_hidden(model, stream[w.begin:w.end].to(device)[None])[0]
            rows = hidden[w.first - 1 - w.begin:w.end - 1 - w.begin]  # position p predicts token p + 1
            total += swkernels.fused_linear_cross_entropy(rows, head.weight, labels.to(device), softcap=softcap,
                                                          bias=head.bias, reduction="sum").double()
            tokens += n
        if progress is not None:
            progress(i + 1, len(plan))
    return PerplexityResult(float(total), tokens, len(plan), time.perf_counter() - start)
