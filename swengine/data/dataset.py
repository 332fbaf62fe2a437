"""From config to training and evaluation rows."""

from __future__ import annotations

import random
from dataclasses import dataclass

from swengine.config import DataConfig
from swengine.data.batches import Row, pack, unpacked
from swengine.data.formats import IGNORE, Example, check_fields, detect_format, to_example
from swengine.data.records import read_records
from swengine.errors import UserError


@dataclass
class Prepared:
    train: list[Row]
    eval: list[Row]
    format: str
    train_examples: int
    trained_tokens: int


def _examples(records: list[dict], fmt: str, tokenizer, cfg: DataConfig) -> list[Example]:
    out = [to_example(r, fmt, tokenizer, train_on_prompt=cfg.train_on_prompt, text_field=cfg.text_field)
           for r in records]
    # keep examples with something to learn inside the length limit
    return [e for e in out if any(label != IGNORE for label in e.labels[:cfg.max_seq_len])]


def prepare(cfg: DataConfig, tokenizer, train_path: str, eval_path: str, seed: int) -> Prepared:
    records = read_records(train_path)
    fmt = detect_format(records[0], cfg.format, cfg.text_field)
    check_fields(records, fmt, train_path, cfg.text_field)
    eval_records = None
    if eval_path:
        eval_records = read_records(eval_path)
        check_fields(eval_records, fmt, eval_path, cfg.text_field)
    elif cfg.eval_fraction > 0 and len(records) > 1:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(records) * cfg.eval_fraction))
        eval_records = [records[i] for i in order[:n_eval]]
        records = [records[i] for i in order[n_eval:]]
    train = _examples(records, fmt, tokenizer, cfg)
    if not train:
        raise UserError(f"{train_path}: no record has a token to train on within data.max_seq_len={cfg.max_seq_len}")
    if cfg.shuffle:
        random.Random(seed).shuffle(train)
    evals = _examples(eval_records, fmt, tokenizer, cfg) if eval_records else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows = pack(train, cfg.max_seq_len, pad) if cfg.packing else unpacked(train, cfg.max_seq_len)
    eval_rows = unpacked(evals, cfg.max_seq_len)
    return Prepared(train_rows, eval_rows, fmt, len(train), sum(e.trained_tokens for e in train))
