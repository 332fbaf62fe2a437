"""From config to training and evaluation rows.

Records longer than ``data.max_seq_len`` tokens follow ``data.truncate``: "truncate" keeps their
first max_seq_len tokens, "drop" leaves them out, "error" stops naming the first one. Truncated or
dropped records are counted (``Prepared.truncated`` / ``Prepared.dropped``) and
``Prepared.length_summary`` is the sentence the run-start line shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from swengine.config import DataConfig
from swengine.data.batches import Row, pack, pack_best_fit, unpacked
from swengine.data.formats import IGNORE, Example, check_fields, detect_format, to_example, with_chat_template
from swengine.data.records import read_records_located
from swengine.errors import UserError


@dataclass
class Prepared:
    train: list[Row]
    eval: list[Row]
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


def _examples(records: list[dict], where: list[str], fmt: str, tokenizer, cfg: DataConfig,
              what: str) -> tuple[list[Example], int]:
    """Examples with something to learn inside the length limit, and how many records were over it
    (truncated later by pack/unpacked, or dropped here, per ``cfg.truncate``)."""
    out, over, dropped = [], [], 0
    for record, at in zip(records, where, strict=True):
        try:
            e = to_example(record, fmt, tokenizer, train_on_prompt=cfg.train_on_prompt, text_field=cfg.text_field)
        except UserError as exc:
            raise UserError(f"{at}: {exc}") from None
        long = len(e.input_ids) > cfg.max_seq_len
        if long:
            over.append((at, len(e.input_ids)))
            if cfg.truncate == "drop":
                dropped += 1
                continue
        if any(label != IGNORE for label in e.labels[:cfg.max_seq_len]):
            out.append(e)
        elif long:
            dropped += 1  # truncation left nothing to learn (the prompt alone fills max_seq_len)
    if over and cfg.truncate == "error":
        first, n = over[0]
        raise UserError(f"{len(over)} of {len(records)} {what} records are longer than data.max_seq_len="
                        f"{cfg.max_seq_len} tokens (first: {first}, {n} tokens); raise data.max_seq_len or set "
                        "data.truncate=truncate (keep the first tokens) or data.truncate=drop")
    return out, len(over) - dropped, dropped


def _without(records: list[dict], where: list[str], drop: list[int]) -> tuple[list[dict], list[str]]:
    if not drop:
        return records, where
    gone = set(drop)
    keep = [i for i in range(len(records)) if i not in gone]
    return [records[i] for i in keep], [where[i] for i in keep]


def prepare(cfg: DataConfig, tokenizer, train_path: str, eval_path: str, seed: int) -> Prepared:
    if cfg.chat_template:
        tokenizer = with_chat_template(tokenizer, cfg.chat_template)
    records, where = read_records_located(train_path)
    fmt = detect_format(records[0], cfg.format, cfg.text_field)
    skipped = check_fields(records, fmt, train_path, cfg.text_field, where, cfg.max_bad_rows)
    records, where = _without(records, where, skipped)
    eval_records = eval_where = None
    if eval_path:
        eval_records, eval_where = read_records_located(eval_path)
        eval_skipped = check_fields(eval_records, fmt, eval_path, cfg.text_field, eval_where,
                                    cfg.max_bad_rows - len(skipped))
        eval_records, eval_where = _without(eval_records, eval_where, eval_skipped)
        skipped += eval_skipped
    elif cfg.eval_fraction > 0 and len(records) > 1:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(records) * cfg.eval_fraction))
        eval_records, eval_where = [records[i] for i in order[:n_eval]], [where[i] for i in order[:n_eval]]
        records, where = [records[i] for i in order[n_eval:]], [where[i] for i in order[n_eval:]]
    train, truncated, dropped = _examples(records, where, fmt, tokenizer, cfg, "training")
    if not train:
        if dropped and cfg.truncate == "drop":
            raise UserError(f"{train_path}: all {dropped} usable records are longer than data.max_seq_len="
                            f"{cfg.max_seq_len} tokens and data.truncate=drop left none; raise data.max_seq_len "
                            "or set data.truncate=truncate")
        raise UserError(f"{train_path}: no record has a token to train on within data.max_seq_len={cfg.max_seq_len}")
    if cfg.shuffle:
        random.Random(seed).shuffle(train)
    evals, eval_cut, eval_dropped = (_examples(eval_records, eval_where, fmt, tokenizer, cfg, "eval")
                                     if eval_records else ([], 0, 0))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packer = pack_best_fit if cfg.packing_strategy == "best_fit" else pack
    train_rows = packer(train, cfg.max_seq_len, pad) if cfg.packing else unpacked(train, cfg.max_seq_len)
    eval_rows = unpacked(evals, cfg.max_seq_len)
    return Prepared(train_rows, eval_rows, fmt, len(train), sum(e.trained_tokens for e in train),
                    truncated=truncated, dropped=dropped, eval_truncated=eval_cut + eval_dropped,
                    max_seq_len=cfg.max_seq_len, truncate_mode=cfg.truncate, malformed=len(skipped))
