"""metrics.jsonl writer: append-only, one ``write`` per whole line, so a killed run keeps every
event and never leaves half a line behind another; fsynced at checkpoints. Every event carries the
run id. Strict JSON only: a non-finite number is written as ``null`` and its key listed in
``nonfinite``."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from swengine import SCHEMA_VERSION
from swengine.errors import UserError

EVENTS = ("run_start", "train", "eval", "checkpoint", "breaker", "phase_end", "run_end")


def _finite(value, key: str, bad: list[str]):
    """A copy of ``value`` with every NaN/inf float replaced by None (its dotted key noted)."""
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(key)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{key}.{k}" if key else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{key}[{i}]", bad) for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return _finite(value.item(), key, bad)
    return value


class MetricsLogger:
    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, rank: int = 0,
                 run_id: str | None = None, log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.run_id = rank, run_id or uuid.uuid4().hex[:12]
        self.phase: str | None = None  # the context-extension phase every event is tagged with
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._repair_torn_tail(log)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard=true needs tensorboard: pip install tensorboard") from None
            self._tb = SummaryWriter(str(tensorboard_dir))

    def _repair_torn_tail(self, log: Callable[[str], None] | None) -> None:
        """A line cut short by a crash (no trailing newline) is removed before anything is appended
        after it, so the file stays one JSON object per line."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n") + 1
        keep = size - (len(tail) - cut)
        os.ftruncate(self._fd, keep)
        if log is not None:
            log(f"{self.path}: removed a torn last line ({size - keep} bytes) left by an earlier crash")

    def log(self, event: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown telemetry event {event!r}")
        record = {"schema_version": SCHEMA_VERSION, "event": event, "time": time.time(), "rank": self.rank, "phase": fields.pop("phase", self.phase),
                  "run_id": self.run_id, **fields}
        bad: list[str] = []
        record = _finite(record, "", bad)
        if bad:
            record["nonfinite"] = bad
        data = (json.dumps(record, default=float, allow_nan=False) + "\n").encode()
        before = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, "No space left on device (short write)")
        except OSError:
            try:
                os.ftruncate(self._fd, before)  # never leave half a line
            except OSError:
                pass
            raise
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time", "rank"):
                    self._tb.add_scalar(f"{event}/{key}", value, record["step"])
        return record

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_events(path: str | Path, event: str | None = None,
                on_torn: Callable[[str], None] | None = None) -> list[dict]:
    """Every event of a metrics.jsonl (optionally only ``event``). A torn last line (a crash during
    a write) is skipped and reported through ``on_torn`` (default: a warning); any other bad line
    is an error naming it."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: the last write was cut short
                msg = f"{path}: ignoring a torn last line ({len(line)} characters)"
                (on_torn or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
                continue
            raise UserError(f"{path}:{i + 1}: not a JSON line") from None
    return [r for r in rows if event is None or r.get("event") == event]
