"""Passkey retrieval (Mohtashami & Jaggi 2023; the format of the position-interpolation and YaRN
papers): a task line, filler sentences, the pass key line at a depth, more filler, the question.

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The pass key is 48213. Remember it. 48213 is the pass key.
    ... There and back again. The grass is green.
    What is the pass key? The pass key is

Depth d puts the pass key line after round(d · n) of the n filler sentences (0: right after the
task line, 1: right before the question). n is the largest count for which the prompt plus the
answer (" 48213") fits in the length, so a prompt is at most one filler sentence short of it.
The pass key is a 5-digit number from ``random.Random`` seeded by (seed, length, depth, trial).

Scoring is exact and needs one forward pass: the answer's tokens are appended and the prompt is
correct iff the argmax at every answer position is the answer's token, which is what greedy
decoding of the answer would produce. Logits are computed only at those positions.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swengine.eval.forward import final_hidden, head_logits

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is"


def passkey_line(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def prompt_text(n_filler: int, before: int, passkey: str) -> str:
    """The prompt with ``n_filler`` filler sentences, ``before`` of them ahead of the pass key line."""
    filler = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    lines = [TASK, " ".join(filler[:before]), passkey_line(passkey), " ".join(filler[before:]), QUESTION]
    return "\n".join(line for line in lines if line)


def make_passkey(seed: int, length: int, depth: float, trial: int) -> str:
    """A 5-digit pass key, the same for the same (seed, length, depth, trial) in any process."""
    return str(random.Random(f"passkey:{seed}:{length}:{depth!r}:{trial}").randint(10000, 99999))


@dataclass
class PasskeyPrompt:
    passkey: str
    depth: float
    input_ids: list[int]  # bos + prompt + answer: what the scorer runs
    answer_start: int  # index of the first answer token in input_ids
    n_filler: int  # filler sentences in the prompt
    before: int  # of which ahead of the pass key line
    text: str  # the prompt (without the answer)

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start:]


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """bos + tokens of ``prompt + answer``, and where the answer's tokens start: after the longest
    common prefix with the prompt's own tokens (a token merging across the boundary belongs to the
    answer, so the model must produce it)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    full = bos + tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    alone = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(full), len(alone)) and full[start] == alone[start]:
        start += 1
    return full, min(start, len(full) - 1)


def build_prompt(tokenizer, length: int, depth: float, passkey: str) -> PasskeyPrompt | None:
    """The longest prompt whose tokens (with bos and the answer) fit in ``length``; None when even
    the prompt without filler does not fit."""

    def make(n: int) -> PasskeyPrompt:
        before = round(depth * n)
        text = prompt_text(n, before, passkey)
        ids, start = encode(tokenizer, text, f" {passkey}")
        return PasskeyPrompt(passkey, depth, ids, start, n, before, text)

    base = make(0)
    if len(base.input_ids) > length:
        return None
    probe = make(len(FILLER))
    per_sentence = max((len(probe.input_ids) - len(base.input_ids)) / len(FILLER), 1.0)
    n = max(int((length - len(base.input_ids)) / per_sentence), 0)
    best = make(n)
    for _ in range(8):  # secant steps with the measured tokens per sentence (sentences join with fewer)
        if n == 0:
            break
        rate = max((len(best.input_ids) - len(base.input_ids)) / n, 1e-3)
        step = int((length - len(best.input_ids)) / rate)
        if step == 0:
            break
        n = max(n + step, 0)
        best = make(n)
    while n > 0 and len(best.input_ids) > length:  # the estimate overshot: step down
        n -= 1
        best = make(n)
    while True:  # and up while one more sentence still fits
        nxt = make(n + 1)
        if len(nxt.input_ids) > length:
            return best
        n, best = n + 1, nxt


@torch.inference_mode()
def score(model, prompt: PasskeyPrompt, device: torch.device | str = "cpu") -> list[int]:
    """The greedy prediction at each answer position (one forward pass; logits only there)."""
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    hidden = final_hidden(model, ids)[0, prompt.answer_start - 1:len(prompt.input_ids) - 1]
    return head_logits(model, hidden).argmax(-1).tolist()


@dataclass
class DepthResult:
    depth: float
    trials: int
    correct: int
    samples: list[dict]

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0


def evaluate_depth(model, tokenizer, length: int, depth: float, trials: int, seed: int,
                   device: torch.device | str = "cpu", on_trial: Callable[[], None] | None = None) -> DepthResult | None:
    """``trials`` prompts at (length, depth); None when the length cannot hold a prompt."""
    samples, correct = [], 0
    for trial in range(trials):
        prompt = build_prompt(tokenizer, length, depth, make_passkey(seed, length, depth, trial))
        if prompt is None:
            return None
        predicted = score(model, prompt, device)
        ok = predicted == prompt.answer_ids
        correct += ok
        samples.append({"passkey": prompt.passkey, "predicted": tokenizer.decode(predicted).strip(), "correct": ok,
                        "tokens": len(prompt.input_ids), "filler_sentences": prompt.n_filler,
                        "sentences_before": prompt.before})
        if on_trial is not None:
            on_trial()
    return DepthResult(depth, trials, correct, samples)


def min_length(tokenizer) -> int:
    """Tokens of the shortest prompt (no filler) with its answer: lengths below it get no passkey test."""
    return len(encode(tokenizer, prompt_text(0, 0, "00000"), " 00000")[0])
