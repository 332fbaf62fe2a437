"""What a report shows, read from a run directory: the telemetry (metrics.jsonl), the resolved
config (run_start's ``config``), the plan when there is one, and whether the run is still going.
Standard library only."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from swengine.errors import UserError
from swengine.telemetry.logger import read_events
from swengine.train.lock import LOCK_NAME


@dataclass
class RunData:
    run_dir: Path
    events: list[dict]
    train: list[dict] = field(default_factory=list)  # every train event, with "superseded"
    evals: list[dict] = field(default_factory=list)
    breakers: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    phase_ends: list[dict] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)
    ends: list[dict] = field(default_factory=list)

    @property
    def start(self) -> dict:
        """The latest run_start (the invocation now or last running)."""
        return self.starts[-1] if self.starts else {}

    @property
    def config(self) -> dict | None:
        return self.start.get("config")

    @property
    def plan(self) -> dict | None:
        if self.start.get("plan"):
            return self.start["plan"]
        path = self.run_dir / "plan.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None

    @property
    def finished(self) -> bool:
        """The latest invocation wrote its run_end."""
        if not self.events:
            return False
        last_start = max((i for i, e in enumerate(self.events) if e.get("event") == "run_start"), default=-1)
        return any(e.get("event") == "run_end" for e in self.events[last_start + 1:])

    @property
    def status(self) -> str:
        if self.finished:
            return self.ends[-1].get("status", "?")
        return "running" if live_pid(self.run_dir) else "stopped (no run_end: killed?)"

    def current(self, events: list[dict]) -> list[dict]:
        return [e for e in events if not e.get("superseded")]


def live_pid(run_dir: Path) -> int | None:
    """The pid of the live run holding run_dir's lock, as far as this host can tell (the lock file
    names it; its flock is not taken here, so a starting run is never disturbed)."""
    try:
        info = json.loads((run_dir / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    if info.get("host") not in (None, socket.gethostname()):
        return pid  # another machine: trust the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def load(run_dir: str | Path) -> RunData:
    """Read a run directory; a one-line UserError when it is not one."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not run.is_dir():
        raise UserError(f"{run} is not a directory; pass the output_dir of a `swengine train` run")
    if not metrics.is_file():
        raise UserError(f"{run} is not a swengine run directory (no metrics.jsonl); pass the output_dir of a "
                        "`swengine train` run")
    events = read_events(metrics, on_torn=lambda _m: None)  # a line being written is read next time
    if not events:
        raise UserError(f"{metrics} has no events yet; wait for the run to start (or use --watch)")
    mark_superseded(events)
    data = RunData(run, events)
    groups = {"train": data.train, "eval": data.evals, "breaker": data.breakers, "checkpoint": data.checkpoints,
              "phase_end": data.phase_ends, "run_start": data.starts, "run_end": data.ends}
    for e in events:
        if e.get("event") in groups:
            groups[e["event"]].append(e)
    return data


def mark_superseded(events: list[dict]) -> None:
    """A step logged before a later invocation started at or before it (a resume after a kill, or
    a rollback) was redone: mark the earlier record ``superseded`` (plots show it faded)."""
    restart_after = None  # the lowest step any later run_start resumed from
    for e in reversed(events):
        if e.get("event") == "run_start":
            s = e.get("step", 0)
            restart_after = s if restart_after is None else min(restart_after, s)
            continue
        step = e.get("step")
        e["superseded"] = (e.get("event") in ("train", "eval", "checkpoint") and restart_after is not None
                           and isinstance(step, int) and step > restart_after)
