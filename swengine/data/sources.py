"""Where records come from: a local file or directory of files (read here), a dataset saved with
``datasets.save_to_disk``, a Hub-layout folder or a Hub dataset id ``org/name`` (through the
``datasets`` library and its cache, imported only when such a source is used).

A :class:`Source` gives the records (a list, or the arrow-backed dataset itself), a name for each
record (``file:line``, ``name row N``) and a fingerprint of the content, cheap to compute, for
the tokenised cache (:mod:`swengine.data.cache`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from swengine.data.records import SUFFIXES, data_files, directory_files, read_records_located
from swengine.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SPLIT_FILE = re.compile(r"^(train|test|validation|valid|dev|eval)([-_.].*)?$")
WHOLE_FILE_HASH = 64 << 20  # files up to this size are hashed whole; larger: size, mtime and both ends


@dataclass(frozen=True)
class SourceSpec:
    """One source's settings: the top-level ``data.*`` keys for train/eval, or one ``data.mix`` item."""

    path: str
    format: str = "auto"
    text_field: str = "text"
    subset: str = ""
    split: str = "train"


class RowNames:
    """``name row N`` for each record of an arrow-backed dataset, without a list of strings."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        return f"{self.name} row {i}"


@dataclass
class Source:
    spec: SourceSpec
    kind: str  # file, directory, save_to_disk, hub
    name: str  # for messages: the path, or "org/name (subset, split)"
    fingerprint: str
    _records: object = None
    _where: object = None

    def read(self):
        """(records, where): records a list of dicts or a ``datasets.Dataset``; where[i] names record i."""
        if self._records is None:
            if self.kind in ("file", "directory"):
                self._records, self._where = _read_local(Path(self.spec.path).expanduser(), self.spec.path)
            else:
                raise AssertionError("datasets sources are loaded when opened")
        return self._records, self._where


def _read_local(p: Path, path: str):
    """A local file or directory's records: .jsonl files read on demand (:mod:`swengine.data
    .lazy_jsonl`: a file larger than RAM tokenises in bounded memory), other formats whole."""
    from swengine.data.lazy_jsonl import Concat, JsonlRecords

    if p.is_file():
        if p.suffix.lower() == ".jsonl":
            records = JsonlRecords(path)
            return records, records.where
        return read_records_located(path)
    parts = [_read_local(f, str(f)) for f in directory_files(p, path)]
    concat = Concat([r for r, _ in parts], [w for _, w in parts])
    return concat, concat.where


def _hash_file(h, f: Path) -> None:
    st = f.stat()
    h.update(f"{f.resolve()}\0{st.st_size}\0".encode())
    with open(f, "rb") as fh:
        if st.st_size <= WHOLE_FILE_HASH:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:  # too big to hash at every start: its size, mtime and both ends
            h.update(f"{st.st_mtime_ns}".encode())
            h.update(fh.read(1 << 20))
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())


def _is_saved(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _is_hub_layout(p: Path) -> bool:
    """A folder laid out as a Hub dataset repository: a dataset card declaring ``configs``, or a
    ``data/`` folder of split-named files (``train-00000-of-00001.parquet``, ``test.jsonl``)."""
    card = p / "README.md"
    if card.is_file() and "configs:" in card.read_text(encoding="utf-8", errors="replace"):
        return True
    data = p / "data"
    return data.is_dir() and any(SPLIT_FILE.match(f.name) for f in data_files(data))


def open_source(spec: SourceSpec) -> Source:
    """The source ``spec.path`` names; a missing path that looks like ``org/name`` is a Hub id."""
    p = Path(spec.path).expanduser()
    if p.is_dir() and _is_saved(p):
        return _datasets_source(spec, "save_to_disk")
    if p.is_dir() and _is_hub_layout(p):
        return _datasets_source(spec, "hub")
    if p.is_file() or p.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for f in ([p] if p.is_file() else data_files(p)):
            _hash_file(h, f)
        return Source(spec, "directory" if p.is_dir() else "file", spec.path, h.hexdigest())
    if HUB_ID.match(spec.path) and not spec.path.startswith((".", "~")) and p.suffix.lower() not in SUFFIXES:
        return _datasets_source(spec, "hub")
    what = "dataset file" if p.suffix.lower() in SUFFIXES else "dataset"
    raise UserError(f"{what} {spec.path} not found; set data.train=<a .jsonl/.json/.parquet/.txt file, a directory "
                    "of them, a datasets.save_to_disk folder or a Hub dataset id org/name>")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _datasets_source(spec: SourceSpec, kind: str) -> Source:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec.path}: reading a datasets folder or a Hub dataset needs the datasets library: "
                        "pip install 'datasets>=3'") from None
    name = spec.path + (f" ({spec.subset or 'default'}, {spec.split})" if kind == "hub" else "")
    datasets.disable_progress_bars()
    try:
        if kind == "save_to_disk":
            ds = datasets.load_from_disk(str(Path(spec.path).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise UserError(f"{spec.path} has no split {spec.split!r} (it has {', '.join(ds)}); set data.split")
                ds = ds[spec.split]
                name = f"{spec.path} ({spec.split})"
        else:
            ds = datasets.load_dataset(spec.path, spec.subset or None, split=spec.split)
    except UserError:
        raise
    except ConnectionError as exc:
        raise UserError(f"{spec.path}: not in the local datasets cache and the Hub cannot be reached "
                        f"({_first_line(exc)}); run once online (or unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), or "
                        "point data.train at a local copy") from None
    except Exception as exc:  # datasets' errors (DatasetNotFoundError, ValueError for a split, ...) share no base
        raise UserError(f"{name}: cannot load it with datasets ({_first_line(exc)}); check the path, data.subset "
                        "and data.split") from None
    if len(ds) == 0:
        raise UserError(f"{name} holds no records")
    fingerprint = hashlib.blake2b(f"{kind}\0{name}\0{ds._fingerprint}".encode(), digest_size=16).hexdigest()
    return Source(spec, kind, name, fingerprint, ds, RowNames(name, len(ds)))


def training_specs(cfg, train_path: str) -> list[SourceSpec]:
    """The training sources of a ``DataConfig``: data.mix's items, or data.train (``train_path``)."""
    if cfg.mix:
        return [SourceSpec(m.path, m.format, m.text_field, m.subset, m.split) for m in cfg.mix]
    return [SourceSpec(train_path, cfg.format, cfg.text_field, cfg.subset, cfg.split)]


def row_slice(records, start: int, end: int) -> list[dict]:
    """Records start..end as dicts (a ``datasets.Dataset`` gives its columns: they are turned into rows)."""
    if isinstance(records, list):
        return records[start:end]
    if hasattr(records, "slice"):  # lazily read local files
        return records.slice(start, end)
    cols = records[start:end]
    names = list(cols)
    return [dict(zip(names, values, strict=True)) for values in zip(*(cols[n] for n in names), strict=True)]
