"""From config to training and evaluation rows.

Records longer than ``data.max_seq_len`` tokens follow ``data.truncate``: "truncate" keeps their
first max_seq_len tokens, "drop" leaves them out, "error" stops naming the first one. Truncated or
dropped records are counted (``Prepared.truncated`` / ``Prepared.dropped``) and
``Prepared.length_summary`` is the sentence the run-start line shows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from swengine.config import DataConfig
from swengine.data.batches import Row
from swengine.data.cache import Tokenised, tokenised
from swengine.data.formats import with_chat_template
from swengine.data.mix import interleave
from swengine.data.rows import LazyRows, best_fit_plan, greedy_plan, single_plan
from swengine.data.sources import SourceSpec, open_source, training_specs
from swengine.errors import UserError


@dataclass
class Prepared:
    train: Sequence[Row]  # built on demand from the memory-mapped tokenised examples (LazyRows)
    eval: Sequence[Row]
    format: str
    train_examples: int
    trained_tokens: int
    truncated: int = 0  # training records longer than max_seq_len, cut to it and kept (data.truncate=truncate)
    # training records longer than max_seq_len and left out: data.truncate=drop, or truncation left
    # no token to learn (the prompt alone fills max_seq_len)
    dropped: int = 0
    eval_truncated: int = 0  # evaluation records longer than max_seq_len (truncated or dropped, as above)
    max_seq_len: int = 0
    truncate_mode: str = "truncate"
    malformed: int = 0  # records left out for not fitting their format (data.max_bad_rows allows them)
    cache: str = ""  # how the tokens were had: "tokenised: cache hit" or "tokenised N records in S s (cached)"
    mix: list[tuple[str, int]] = field(default_factory=list)  # data.mix: (source, training examples drawn)

    @property
    def mix_summary(self) -> str:
        """"" without data.mix; else e.g. "mix a.jsonl 700 (70.0%), b.jsonl 300 (30.0%)"."""
        total = sum(n for _, n in self.mix) or 1
        return ("mix " + ", ".join(f"{name} {n:,} ({100 * n / total:.1f}%)" for name, n in self.mix)) if self.mix else ""

    @property
    def length_summary(self) -> str:
        """"" when every record fits; else e.g. "3 records longer than data.max_seq_len=512 truncated"."""
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} training record{'s' * (self.truncated != 1)} truncated")
        if self.dropped:
            parts.append(f"{self.dropped} training record{'s' * (self.dropped != 1)} dropped")
        if self.eval_truncated:
            verb = "dropped" if self.truncate_mode == "drop" else "truncated or dropped"
            parts.append(f"{self.eval_truncated} eval record{'s' * (self.eval_truncated != 1)} {verb}")
        malformed = (f"; {self.malformed} malformed record{'s' * (self.malformed != 1)} left out "
                     "(data.max_bad_rows)") if self.malformed else ""
        if not parts:
            return malformed.removeprefix("; ")
        return (f"{', '.join(parts)} (longer than data.max_seq_len={self.max_seq_len}; data.truncate="
                f"{self.truncate_mode}){malformed}")


@dataclass
class Picked:
    """Examples of one source kept for training or evaluation: indices into its store."""

    source: Tokenised
    idx: np.ndarray
    truncated: int = 0
    dropped: int = 0


def _fit(t: Tokenised, idx: np.ndarray, cfg: DataConfig, what: str) -> Picked:
    """The examples with something to learn inside ``cfg.max_seq_len``; longer ones truncated
    (later, when rows are built) or dropped per ``cfg.truncate``, and counted."""
    store, limit = t.store, cfg.max_seq_len
    long = store.lengths[idx] > limit
    first = store.first_label[idx]
    learns = (first >= 0) & (first < limit)
    if cfg.truncate == "error" and long.any():
        k = int(idx[np.argmax(long)])
        raise UserError(f"{int(long.sum())} of {len(idx)} {what} records are longer than data.max_seq_len={limit} "
                        f"tokens (first: {store.where(k)}, {int(store.lengths[k])} tokens); raise data.max_seq_len or "
                        "set data.truncate=truncate (keep the first tokens) or data.truncate=drop")
    if cfg.truncate == "drop":
        keep, dropped = ~long & learns, int(long.sum())
    else:  # truncation may leave nothing to learn (the prompt alone fills max_seq_len): dropped too
        keep, dropped = learns, int((long & ~learns).sum())
    return Picked(t, idx[keep], int(long.sum()) - dropped, dropped)


def _split(t: Tokenised, cfg: DataConfig, seed: int, has_eval: bool) -> tuple[np.ndarray, np.ndarray]:
    """(training, evaluation) example indices: data.eval_fraction of them held out, chosen by seed,
    unless there is a data.eval."""
    n = len(t.store)
    if has_eval or cfg.eval_fraction <= 0 or n < 2:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = list(range(n))
    random.Random(seed).shuffle(order)  # the order releases before the cache drew: resumes across them match
    order = np.asarray(order, dtype=np.int64)
    n_eval = max(1, int(n * cfg.eval_fraction))
    return order[n_eval:], order[:n_eval]


def _no_training_rows(picked: list[Picked], cfg: DataConfig) -> UserError:
    names = ", ".join(p.source.name for p in picked)
    dropped = sum(p.dropped for p in picked)
    if dropped and cfg.truncate == "drop":
        return UserError(f"{names}: all {dropped} usable records are longer than data.max_seq_len={cfg.max_seq_len} "
                         "tokens and data.truncate=drop left none; raise data.max_seq_len or set data.truncate=truncate")
    return UserError(f"{names}: no record has a token to train on within data.max_seq_len={cfg.max_seq_len}")


def _rows(stores: list, src: np.ndarray, idx: np.ndarray, cfg: DataConfig, pad: int | None, plan: str) -> LazyRows:
    lengths = np.zeros(len(idx), dtype=np.int64)
    for s, store in enumerate(stores):
        lengths[src == s] = store.lengths[idx[src == s]]
    if plan == "single":
        order, offsets = single_plan(len(idx))
    else:
        order, offsets = (best_fit_plan if plan == "best_fit" else greedy_plan)(lengths, cfg.max_seq_len)
    return LazyRows(stores, src[order], idx[order], offsets, cfg.max_seq_len, pad)


def _cache_summary(parts: list[Tokenised]) -> str:
    if all(t.hit for t in parts):
        return "tokenised: cache hit"
    built = [t for t in parts if not t.hit]
    records = sum(len(t.store) + t.malformed for t in built)
    return (f"tokenised {records:,} records in {sum(t.seconds for t in built):.1f} s (cached"
            f"{'; the rest: cache hit' if len(built) < len(parts) else ''})")


def prepare(cfg: DataConfig, tokenizer, train_path: str, eval_path: str, seed: int, *,
            progress: bool = False) -> Prepared:
    """Training and evaluation rows for ``cfg`` (``train_path``: data.train or the demo's; unused
    with data.mix). ``progress``: a progress bar on stderr while tokenising."""
    if cfg.chat_template:
        tokenizer = with_chat_template(tokenizer, cfg.chat_template)
    if cfg.num_proc < 1:
        raise UserError(f"data.num_proc={cfg.num_proc}: it must be at least 1 (the processes tokenising on a cache miss)")
    budget = [cfg.max_bad_rows]  # malformed records allowed across every source

    def load(spec: SourceSpec) -> Tokenised:
        t = tokenised(open_source(spec), tokenizer, requested_format=spec.format, train_on_prompt=cfg.train_on_prompt,
                      cache_dir=cfg.cache_dir, num_proc=cfg.num_proc, progress=progress, max_bad=budget[0])
        budget[0] -= t.malformed
        return t

    if cfg.mix:
        if cfg.train:
            raise UserError("data.train and data.mix are both set; use data.mix alone (one item per source)")
        bad = [i for i, m in enumerate(cfg.mix) if not m.path or m.weight <= 0]
        if bad:
            raise UserError(f"data.mix[{bad[0]}] needs a path and a weight > 0, e.g. "
                            "data.mix='[{\"path\": \"a.jsonl\", \"weight\": 0.7}, {\"path\": \"b.jsonl\", \"weight\": 0.3}]'")
    parts = [load(s) for s in training_specs(cfg, train_path)]
    splits = [_split(t, cfg, seed + k, bool(eval_path)) for k, t in enumerate(parts)]
    train = [_fit(t, tr, cfg, "training") for t, (tr, _) in zip(parts, splits, strict=True)]
    empty = [p for p in train if not len(p.idx)]  # with data.mix: every source must give some
    if empty:
        raise _no_training_rows(empty, cfg)
    for k, p in enumerate(train):
        if cfg.shuffle:
            order = p.idx.tolist()
            random.Random(seed + k).shuffle(order)
            p.idx = np.asarray(order, dtype=np.int64)
    if cfg.mix:
        src, idx = interleave([p.idx for p in train], [m.weight for m in cfg.mix], seed)
    else:
        src, idx = np.zeros(len(train[0].idx), dtype=np.int64), train[0].idx
    if eval_path:
        eval_fmt = cfg.format if cfg.mix else parts[0].format
        extra = load(SourceSpec(eval_path, eval_fmt, cfg.text_field, cfg.subset, cfg.split))
        evals = [_fit(extra, np.arange(len(extra.store), dtype=np.int64), cfg, "eval")]
        eval_stores = [extra.store]
    else:
        evals = [_fit(t, ev, cfg, "eval") for t, (_, ev) in zip(parts, splits, strict=True)]
        eval_stores = [t.store for t in parts]
        extra = None
    stores = [t.store for t in parts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = ("best_fit" if cfg.packing_strategy == "best_fit" else "greedy") if cfg.packing else "single"
    train_rows = _rows(stores, src, idx, cfg, pad if cfg.packing else None, plan)
    eval_src = np.concatenate([np.full(len(p.idx), s, dtype=np.int64) for s, p in enumerate(evals)])
    eval_rows = _rows(eval_stores, eval_src, np.concatenate([p.idx for p in evals]), cfg, None, "single")
    trained = sum(int(store.trained[idx[src == s]].sum()) for s, store in enumerate(stores))
    mix = [(p.source.name, int((src == s).sum())) for s, p in enumerate(train)] if cfg.mix else []
    return Prepared(train_rows, eval_rows, "+".join(dict.fromkeys(t.format for t in parts)), len(idx), trained,
                    truncated=sum(p.truncated for p in train), dropped=sum(p.dropped for p in train),
                    eval_truncated=sum(p.truncated + p.dropped for p in evals), max_seq_len=cfg.max_seq_len,
                    truncate_mode=cfg.truncate, malformed=cfg.max_bad_rows - budget[0],
                    cache=_cache_summary(parts + ([extra] if extra else [])), mix=mix)
