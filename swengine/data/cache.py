"""Tokenise a source once and keep it on disk, memory-mapped.

An entry ``<data.cache_dir>/<key>/`` holds ``tokens.arrow`` (an Arrow IPC file: input_ids and
labels as int32 lists, with each example's length, first trained position, trained-token count
and where it came from) and ``meta.json`` (written last). The key hashes the source's content
fingerprint, the tokenizer (its vocabulary and rules, special tokens and chat template) and every
setting that changes tokens (format, text field, train_on_prompt). An entry is built in a
temporary folder and renamed into place, so a killed run leaves none half-written (and the next
build removes the temporary folders of runs that are gone); one that does not check out
(unreadable, wrong size, count or CRC-32 of its bytes) is built again. Malformed records are counted in
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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swengine.data.formats import IGNORE, check_fields, detect_format, record_error, text_examples, to_example
from swengine.data.sources import Source, row_slice
from swengine.errors import UserError

VERSION = 2  # bump when what is stored, or how records become tokens, changes (2: meta.json has the CRC-32)
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


def _view(array, buffer: int, count: int = -1) -> np.ndarray:
    """An int32 buffer of an Arrow array as a numpy view on the memory map (``to_numpy`` would
    import pandas: slow, and tens of MiB). Buffers: 1 = a column's values or a list's offsets,
    3 = a list's values; arrays written by :func:`_batch` have no offset and no nulls."""
    return np.frombuffer(array.buffers()[buffer], dtype=np.int32, count=count)


class TokenStore:
    """A cache entry's examples, memory-mapped: ``get(i)`` gives (ids, labels) as lists."""

    def __init__(self, folder: Path):
        import pyarrow as pa

        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        arrow = folder / "tokens.arrow"
        if arrow.stat().st_size != self.meta["bytes"]:
            raise ValueError("size differs from meta.json")
        if crc32(arrow) != self.meta["crc32"]:  # ~5 GB/s: a damaged byte anywhere is caught
            raise ValueError("CRC-32 differs from meta.json")
        table = pa.ipc.open_file(pa.memory_map(str(arrow))).read_all()
        if table.num_rows != self.meta["examples"]:
            raise ValueError("example count differs from meta.json")
        self.table = table
        self._ids, self._labels, starts = [], [], [0]
        for ids, labels in zip(table.column("input_ids").chunks, table.column("labels").chunks, strict=True):
            self._ids.append((_view(ids, 1, len(ids) + 1), _view(ids, 3)))
            self._labels.append(_view(labels, 3))
            starts.append(starts[-1] + len(ids))
        self._starts = np.asarray(starts[1:], dtype=np.int64)
        self.lengths, self.first_label, self.trained = (
            np.concatenate([_view(c, 1, len(c)) for c in table.column(name).chunks]).astype(np.int64)
            for name in ("length", "first_label", "trained"))

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


def _examples(records: list[dict], where: list[str]) -> list:
    w = _WORK
    if w["fmt"] == "text":  # one tokenizer call for the chunk
        return text_examples([r[w["text_field"]] for r in records], w["tokenizer"])
    out = []
    for record, at in zip(records, where, strict=True):
        try:
            out.append(to_example(record, w["fmt"], w["tokenizer"], train_on_prompt=w["train_on_prompt"],
                                  text_field=w["text_field"]))
        except UserError as exc:
            raise UserError(f"{at}: {exc}") from None
    return out


def _tokenise(task: tuple[int, int]):
    """Records start..end → flat int32 ids/labels, per-example lengths, first trained position,
    trained count and where (malformed records, known from the check, are skipped)."""
    start, end = task
    keep = [i for i in range(start, end) if i not in _WORK["bad"]]
    chunk = row_slice(_WORK["records"], start, end)
    where = [_WORK["where"][i] for i in keep]
    examples = _examples([chunk[i - start] for i in keep], where)
    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=int(lengths.sum()))
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    trained_at = np.flatnonzero(labels != IGNORE)
    trained = np.add.reduceat((labels != IGNORE).astype(np.int64), starts) if len(labels) else lengths
    first = trained_at[np.minimum(np.searchsorted(trained_at, starts), max(len(trained_at) - 1, 0))] \
        if len(trained_at) else np.full(len(lengths), -1)
    first = np.where((trained > 0) & (first >= starts), first - starts, -1)
    return ids, labels, lengths.astype(np.int32), first, trained, where


def _int32(values):
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


TMP_PREFIX = ".tmp-"


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            value = zlib.crc32(block, value)
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _sweep(root: Path) -> None:
    """Remove the temporary folders of builds whose process is gone (killed mid-build); a live
    build's folder (its pid running) is left alone."""
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        parts = tmp.name.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def _batch(out):
    """A record batch of one tokenised chunk, built from buffers (``pa.array`` would import pandas)."""
    import pyarrow as pa

    ids, labels, lengths, first, trained, where = out
    offsets = _int32(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    text = [w.encode() for w in where]
    text_offsets = np.concatenate([[0], np.cumsum([len(t) for t in text], dtype=np.int64)]).astype(np.int32)
    where_array = pa.Array.from_buffers(pa.string(), len(text), [None, pa.py_buffer(text_offsets),
                                                                   pa.py_buffer(b"".join(text))])
    lists = [pa.ListArray.from_arrays(offsets, _int32(column)) for column in (ids, labels)]
    return pa.record_batch([*lists,
                            _int32(lengths), _int32(first), _int32(trained), where_array],
                           names=["input_ids", "labels", "length", "first_label", "trained", "where"])


def _build(source: Source, fmt: str, bad: set[int], tokenizer, settings: dict, folder: Path, num_proc: int,
           progress: bool, meta: dict) -> None:
    import pyarrow as pa
    from tqdm import tqdm

    records, where = source.read()
    n = len(records)
    _sweep(folder.parent)
    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
        meta = {**meta, "examples": n - len(bad), "bytes": (tmp / "tokens.arrow").stat().st_size,
                "crc32": crc32(tmp / "tokens.arrow")}
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


def _malformed(records, fmt: str, name: str, text_field: str, where) -> list[int]:
    """Indices of the records that do not fit ``fmt``, checked a chunk at a time (a dataset's
    rows come out of Arrow far faster in slices than one by one)."""
    bad = []
    for start in range(0, len(records), CHUNK):
        chunk = row_slice(records, start, start + CHUNK)
        bad += [start + i for i in check_fields(chunk, fmt, name, text_field, max_bad=len(chunk))]
    return bad


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
        bad = _malformed(records, fmt, source.name, text_field, where)
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
