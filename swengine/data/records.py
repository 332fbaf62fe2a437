"""Read training records from jsonl / json / parquet / txt files, or a directory of them."""

from __future__ import annotations

import json
from pathlib import Path

from swengine.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _text(p: Path, path: str) -> str:
    """The file as UTF-8 text (a leading BOM is dropped), or one line naming the first bad byte's line."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                        "save the file as UTF-8") from None


def read_records_located(path: str) -> tuple[list[dict], list[str]]:
    """Rows as dicts, and where each came from (``file:line`` for .jsonl, ``file record N`` otherwise).
    A directory: every data file in it (recursively, sorted by path), concatenated."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_directory(p, path)
    if not p.is_file():
        raise UserError(f"dataset file {path} not found; set data.train=<a .jsonl/.json/.parquet/.txt file or a "
                        "directory of them>")
    suffix = p.suffix.lower()
    where: list[str] | None = None
    if suffix == ".jsonl":
        # JSON Lines separates records with "\n" only: U+2028, U+0085, \v, \f ... are valid inside strings
        rows, where = [], []
        for i, line in enumerate(_text(p, path).split("\n"), 1):
            if not line.strip(" \t\r"):  # JSON's whitespace only
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{i} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
            where.append(f"{path}:{i}")
    elif suffix == ".json":
        try:
            data = json.loads(_text(p, path))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet needs pyarrow: pip install 'swengine[parquet]'") from None
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError, ...) share no base
            raise UserError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    elif suffix == ".txt":
        blocks = [b.strip() for b in _text(p, path).split("\n\n")]
        rows = [{"text": b} for b in blocks if b]
    else:
        raise UserError(f"{path}: unsupported dataset type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path} holds no records")
    if where is None:
        where = [f"{path} record {i}" for i in range(len(rows))]
    for r, w in zip(rows, where, strict=True):
        if not isinstance(r, dict):
            raise UserError(f"{w}: every record must be a JSON object (got {type(r).__name__})")
    return rows, where


def data_files(p: Path) -> list[Path]:
    """A directory's data files: recursively, sorted by path, hidden files and folders skipped."""
    return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(p).parts))


def directory_files(p: Path, path: str) -> list[Path]:
    """:func:`data_files` of a data directory, or one line saying it has none."""
    files = data_files(p)
    if not files:
        raise UserError(f"dataset directory {path} has no {'/'.join(SUFFIXES)} files")
    return files


def _read_directory(p: Path, path: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    for f in directory_files(p, path):
        r, w = read_records_located(str(f))
        rows += r
        where += w
    return rows, where


def read_records(path: str) -> list[dict]:
    """Rows as dicts. A .txt file gives one {"text": ...} record per blank-line-separated block."""
    return read_records_located(path)[0]
