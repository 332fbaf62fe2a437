"""Tokenise a source once and keep it on disk, memory-mapped.

An entry ``<data.cache_dir>/<key>/`` holds ``tokens.arrow`` (an Arrow IPC file: input_ids and
labels as int32 lists, with each example's length, first trained position, trained-token count
and where it came from) and ``meta.json`` (written last). The key hashes the source's content
fingerprint, the tokenizer (its vocabulary and rules, special tokens and chat template) and every
setting that changes tokens (format, text field, train_on_prompt). An entry is built in a
temporary folder and renamed into place, so a killed run leaves none half-written; one that does
not check out (unreadable, wrong size or count) is built again. Malformed records are counted in
the entry, not dropped from it: ``data.max_bad_rows`` is applied when the entry is used.

Tokenising runs over ``data.num_proc`` processes (forked, chunks in order) with a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swengine.data.formats import IGNORE, check_fields, detect_format, record_error, to_example
from swengine.data.sources import Source, row_slice
from swengine.errors import UserError

VERSION = 1  # bump when what is stored, or how records become tokens, changes
CHUNK = 1000  # records per tokenising task
_WORK: dict = {}  # what forked workers tokenise with (set before the pool forks)


def default_cache_dir() -> Path:
    root = os.environ.get("SWENGINE_CACHE")
    return Path(root).expanduser() / "tokenized" if root else Path.home() / ".cache" / "swengine" / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:"
              f"{sorted(tokenizer.get_vocab().items())}").encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        h.update(f"\0{name}={getattr(tokenizer, name, None)}".encode())
    return h.hexdigest()


class TokenStore:
    """A cache entry's examples, memory-mapped: ``get(i)`` gives (ids, labels) as lists."""

    def __init__(self, folder: Path):
        import pyarrow as pa

        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        arrow = folder / "tokens.arrow"
        if arrow.stat().st_size != self.meta["bytes"]:
            raise ValueError("size differs from meta.json")
        table = pa.ipc.open_file(pa.memory_map(str(arrow))).read_all()
        if table.num_rows != self.meta["examples"]:
            raise ValueError("example count differs from meta.json")
        self.table = table
        self._ids, self._labels, starts = [], [], [0]
        for ids, labels in zip(table.column("input_ids").chunks, table.column("labels").chunks, strict=True):
            self._ids.append((ids.offsets.to_numpy(), ids.values.to_numpy(zero_copy_only=True)))
            self._labels.append(labels.values.to_numpy(zero_copy_only=True))
            starts.append(starts[-1] + len(ids))
        self._starts = np.asarray(starts[1:], dtype=np.int64)
        self.lengths = table.column("length").to_numpy().astype(np.int64)
        self.first_label = table.column("first_label").to_numpy().astype(np.int64)
        self.trained = table.column("trained").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[list[int], list[int]]:
        c = int(np.searchsorted(self._starts, i, side="right"))
        k = i - (int(self._starts[c - 1]) if c else 0)
        offsets, ids = self._ids[c]
        a, b = int(offsets[k]), int(offsets[k + 1])
        return ids[a:b].tolist(), self._labels[c][a:b].tolist()

    def where(self, i: int) -> str:
        return self.table.column("where")[i].as_py()


@dataclass
class Tokenised:
    store: TokenStore
    format: str
    name: str
    malformed: int  # records left out for not fitting their format
    first_malformed: str  # the message naming the first of them ("" if none)
    hit: bool
    seconds: float


def _tokenise(task: tuple[int, int]):
    """Records start..end → flat int32 ids/labels, per-example lengths, first trained position,
    trained count and where (malformed records, known from the check, are skipped)."""
    start, end = task
    w = _WORK
    ids, labels, lengths, first, trained, where = [], [], [], [], [], []
    for i, record in enumerate(row_slice(w["records"], start, end), start):
        if i in w["bad"]:
            continue
        at = w["where"][i]
        try:
            e = to_example(record, w["fmt"], w["tokenizer"], train_on_prompt=w["train_on_prompt"],
                           text_field=w["text_field"])
        except UserError as exc:
            raise UserError(f"{at}: {exc}") from None
        lab = np.asarray(e.labels, dtype=np.int32)
        trained_at = np.flatnonzero(lab != IGNORE)
        ids.append(np.asarray(e.input_ids, dtype=np.int32))
        labels.append(lab)
        lengths.append(len(e.input_ids))
        first.append(int(trained_at[0]) if len(trained_at) else -1)
        trained.append(len(trained_at))
        where.append(at)
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))
    return cat(ids), cat(labels), np.asarray(lengths, dtype=np.int32), first, trained, where


def _batch(out):
    import pyarrow as pa

    ids, labels, lengths, first, trained, where = out
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    return pa.record_batch({
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, type=pa.int32())),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels, type=pa.int32())),
        "length": pa.array(lengths, type=pa.int32()),
        "first_label": pa.array(first, type=pa.int32()),
        "trained": pa.array(trained, type=pa.int32()),
        "where": pa.array(where, type=pa.string()),
    })


def _build(source: Source, fmt: str, bad: set[int], tokenizer, settings: dict, folder: Path, num_proc: int,
           progress: bool, meta: dict) -> None:
    import pyarrow as pa
    from tqdm import tqdm

    records, where = source.read()
    n = len(records)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    _WORK.update(records=records, where=where, bad=bad, fmt=fmt, tokenizer=tokenizer, **settings)
    tasks = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    pool = None
    try:
        if num_proc > 1 and len(tasks) > 1:
            pool = multiprocessing.get_context("fork").Pool(min(num_proc, len(tasks)))
            results = pool.imap(_tokenise, tasks)
        else:
            results = map(_tokenise, tasks)
        writer = None
        with tqdm(total=n, desc=f"tokenising {source.name}", unit=" records", file=sys.stderr, disable=not progress,
                  leave=False) as bar:
            for (a, b), out in zip(tasks, results, strict=True):
                batch = _batch(out)
                if writer is None:
                    writer = pa.ipc.new_file(str(tmp / "tokens.arrow"), batch.schema)
                writer.write_batch(batch)
                bar.update(b - a)
        writer.close()
        meta = {**meta, "examples": n - len(bad), "bytes": (tmp / "tokens.arrow").stat().st_size}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:  # another run put the same entry in place first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        _WORK.clear()


def _check_budget(malformed: int, first: str, max_bad: int) -> None:
    if malformed > max_bad:
        raise UserError(first + (f" ({malformed} malformed, data.max_bad_rows={max_bad})" if max_bad else ""))


def tokenised(source: Source, tokenizer, *, requested_format: str, train_on_prompt: bool, cache_dir: str,
              num_proc: int, progress: bool, max_bad: int) -> Tokenised:
    """The source's examples from the cache, tokenised (and cached) first if they are not there.
    More than ``max_bad`` malformed records: the error naming the first (before tokenising)."""
    t0 = time.perf_counter()
    text_field = source.spec.text_field
    settings = {"train_on_prompt": train_on_prompt, "text_field": text_field}
    key_parts = {"version": VERSION, "source": source.fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
                 "format": requested_format, **settings}
    key = hashlib.blake2b(json.dumps(key_parts, sort_keys=True).encode(), digest_size=16).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / key
    hit = folder.is_dir()
    if hit:
        try:
            store = TokenStore(folder)
        except Exception:  # any damage (missing or cut file, bad JSON, wrong size): build it again
            shutil.rmtree(folder, ignore_errors=True)
            hit = False
    if not hit:
        records, where = source.read()
        if not len(records):
            raise UserError(f"{source.name} holds no records")
        fmt = detect_format(row_slice(records, 0, 1)[0], requested_format, text_field)
        bad = check_fields(records, fmt, source.name, text_field, where, max_bad=len(records))
        first = record_error(row_slice(records, bad[0], bad[0] + 1)[0], fmt, source.name, bad[0], text_field,
                             where[bad[0]]) if bad else ""
        meta = {**key_parts, "name": source.name, "detected_format": fmt, "malformed": len(bad),
                "first_malformed": first, "created": time.time()}
        _check_budget(len(bad), first, max_bad)
        if len(bad) < len(records):
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"data.cache_dir {root} cannot be created ({exc}); set data.cache_dir=<a writable "
                                "folder>") from None
            _build(source, fmt, set(bad), tokenizer, settings, folder, num_proc, progress, meta)
            store = TokenStore(folder)
        else:
            raise UserError(first + (f" ({len(bad)} malformed, every record)" if len(bad) > 1 else ""))
    m = store.meta
    _check_budget(m["malformed"], m["first_malformed"], max_bad)
    return Tokenised(store, m["detected_format"], source.name, m["malformed"], m["first_malformed"], hit,
                     time.perf_counter() - t0)
