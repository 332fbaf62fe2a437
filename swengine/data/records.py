"""Read training records from jsonl / json / parquet / txt files."""

from __future__ import annotations

import json
from pathlib import Path

from swengine.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def read_records(path: str) -> list[dict]:
    """Rows as dicts. A .txt file gives one {"text": ...} record per blank-line-separated block."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"dataset file {path} not found; set data.train=<path to a .jsonl/.json/.parquet/.txt file>")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{i} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet needs pyarrow: pip install 'swengine[parquet]'") from None
        rows = pq.read_table(p).to_pylist()
    elif suffix == ".txt":
        blocks = [b.strip() for b in p.read_text().split("\n\n")]
        rows = [{"text": b} for b in blocks if b]
    else:
        raise UserError(f"{path}: unsupported dataset type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path} holds no records")
    if not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: every record must be a JSON object")
    return rows
