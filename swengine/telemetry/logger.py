"""metrics.jsonl writer: append-only, flushed per event, so a killed run keeps every event."""

from __future__ import annotations

import json
import time
from pathlib import Path

from swengine.errors import UserError

EVENTS = ("run_start", "train", "eval", "checkpoint", "breaker", "run_end")


class MetricsLogger:
    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, rank: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard=true needs tensorboard: pip install tensorboard") from None
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, event: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown telemetry event {event!r}")
        record = {"event": event, "time": time.time(), "rank": self.rank, "phase": fields.pop("phase", None), **fields}
        self._file.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time", "rank"):
                    self._tb.add_scalar(f"{event}/{key}", value, record["step"])
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_events(path: str | Path, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if event is None or r["event"] == event]
