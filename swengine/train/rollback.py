"""Roll a run directory back to an earlier checkpoint: ``swengine rollback RUN --to TARGET``.

Targets: ``phase-N`` (the checkpoint that completed context-extension phase N), ``step-N``,
``best`` (the best eval loss) and ``last-good`` (the newest checkpoint that verifies and was not
written after a circuit-breaker trip). Restoring makes the target the newest checkpoint of the run:
every checkpoint after it is moved (never deleted) to ``<run>/archive/rollback-<time>/checkpoints``,
and ``<run>/adapter`` becomes a byte-for-byte copy of the target's adapter (a different one is
archived first), so ``swengine train <config> --resume auto`` continues from the target and
``swengine merge/eval RUN`` use its weights. The target itself is not touched. Refused while a live
run holds the directory's lock.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swengine.errors import UserError
from swengine.train import checkpoint as ckpt
from swengine.train.lock import LOCK_NAME, RunLock

TARGET_FORMS = "phase-N, step-N, best or last-good"
ADAPTER_DIR = "adapter"


@dataclass
class Entry:
    """One ``checkpoints/step-N`` directory and what its trainer_state.json says."""

    path: Path
    step: int
    state: dict = field(default_factory=dict)
    problem: str | None = None  # why it fails verification; None: it verifies

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def short(self) -> str:
        return f"step-{self.step}"

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def kind(self) -> str | None:
        return self.state.get("kind")

    @property
    def phase(self) -> str | None:
        return self.state.get("phase")

    @property
    def completed_phase(self) -> str | None:
        return self.state.get("completed_phase") or (self.phase if self.kind == "phase" else None)

    @property
    def tripped(self) -> bool:
        return bool(self.state.get("tripped", False))

    def to_dict(self) -> dict:
        return {"name": self.name, "step": self.step, "kind": self.kind, "phase": self.phase,
                "completed_phase": self.completed_phase, "tripped": self.tripped, "valid": self.valid,
                "problem": self.problem, "best_eval": self.state.get("best_eval"), "path": str(self.path)}


@dataclass
class Result:
    target: Entry
    archive: Path | None  # where what came after went (None: nothing was newer)
    moved: list[str]  # run-relative paths that were archived
    adapter: Path  # <run>/adapter, now equal to the target's


def check_run_dir(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not run.exists():
        raise UserError(f"{run} does not exist; pass the output_dir of a `swengine train` run")
    if not run.is_dir() or not any((run / n).exists() for n in ("checkpoints", "metrics.jsonl", LOCK_NAME)):
        raise UserError(f"{run} is not a swengine run directory (no checkpoints/ or metrics.jsonl); pass the "
                        "output_dir of a `swengine train` run")
    return run


def scan(run: Path) -> list[Entry]:
    """Every step-N directory of the run, oldest first, each verified."""
    entries = []
    for path in ckpt.all_step_dirs(run):
        entry = Entry(path, ckpt.step_of(path))
        try:
            ckpt.verify(path)
        except ckpt.CheckpointError as exc:
            entry.problem = str(exc).removeprefix(f"{path.name}: ")
        try:
            entry.state = ckpt.read_state(path)
        except (OSError, ValueError):
            pass
        entries.append(entry)
    return entries


def targets(entries: list[Entry]) -> dict[str, Entry]:
    """Named targets that exist: last-good, best, phase-N (newest checkpoint completing it)."""
    valid = [e for e in entries if e.valid]
    found: dict[str, Entry] = {}
    good = [e for e in valid if not e.tripped]
    if good:
        found["last-good"] = good[-1]
    best = _best(valid)
    if best is not None:
        found["best"] = best
    for e in valid:
        if e.completed_phase:
            found[e.completed_phase] = e  # oldest first: the newest wins
    return found


def _best(valid: list[Entry]) -> Entry | None:
    """The checkpoint with the lowest eval loss, as the checkpoints' own best_path/best_eval say
    (a best checkpoint may be rewritten as periodic at the same step, so kind alone is not enough)."""
    by_name = {e.name: e for e in valid}
    scored = []
    for e in valid:
        best_path, best_eval = e.state.get("best_path"), e.state.get("best_eval")
        if best_path and best_eval is not None and Path(best_path).name in by_name:
            scored.append((float(best_eval), -by_name[Path(best_path).name].step, Path(best_path).name))
    if scored:
        return by_name[min(scored)[2]]
    kinds = [e for e in valid if e.kind == "best"]
    return kinds[-1] if kinds else None


def last_good(run_dir: str | Path, before: int | None = None, log: Callable[[str], None] = print) -> Path | None:
    """For a rollback inside a run: the newest checkpoint older than step ``before`` (a trip's
    ``since``) that was not written after a trip and verifies (checked newest first, stopping at
    the first that passes; each one skipped is named in one line)."""
    for path in reversed(ckpt.all_step_dirs(Path(run_dir))):
        if before is not None and ckpt.step_of(path) >= before:
            continue
        try:
            if ckpt.read_state(path).get("tripped"):
                continue
            ckpt.verify(path)
        except (OSError, ValueError, ckpt.CheckpointError) as exc:
            log(f"skipping checkpoint {path}: {exc}")
            continue
        return path
    return None


def _phase_number(name: str) -> int:
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


def resolve(entries: list[Entry], to: str) -> Entry:
    """The checkpoint ``to`` names, or a one-line UserError listing what there is."""
    if not entries:
        raise UserError("the run has no checkpoints to roll back to")
    to = to.strip()
    named = targets(entries)
    steps = ", ".join(e.short for e in entries if e.valid) or "none that verifies"
    if to in ("last-good", "best"):
        if to not in named:
            why = ("no checkpoint verifies" if not any(e.valid for e in entries) else
                   "every checkpoint that verifies was written after a breaker trip" if to == "last-good" else
                   "the run has no eval loss (data.eval / logging.eval_every)")
            raise UserError(f"no {to} checkpoint: {why}; valid targets: {steps}")
        return named[to]
    kind, _, number = to.partition("-")
    if kind == "phase" and number.isdigit():
        name = f"phase-{int(number)}"
        if name in named:
            return named[name]
        phases = sorted((k for k in named if k.startswith("phase-")), key=_phase_number)
        if phases:
            raise UserError(f"no checkpoint completes {name}; valid phases: {', '.join(phases)} (or {steps}, best, "
                            "last-good)")
        raise UserError(f"no checkpoint completes {name}: the run has no phase checkpoints (it ran without "
                        f"context.phases, or no phase has ended yet); valid targets: {steps}, best, last-good")
    if kind == "step" and number.isdigit():
        for e in entries:
            if e.step == int(number):
                if not e.valid:
                    raise UserError(f"{e.name} fails verification ({e.problem}); valid targets: {steps}")
                return e
        raise UserError(f"no checkpoint at step {int(number)}; valid targets: {steps}")
    raise UserError(f"--to {to!r}: not a target; use {TARGET_FORMS} (this run: {steps})")


def _holder(run: Path) -> str:
    try:
        info = json.loads((run / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}" if info.get("pid")
            else "another process")


def _adapter_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.startswith("adapter_"))


def _same_adapter(a: Path, b: Path) -> bool:
    if not a.is_dir():
        return False
    names = _adapter_files(b)
    return names == _adapter_files(a) and all(ckpt.sha256_file(a / n) == ckpt.sha256_file(b / n) for n in names)


def _archive_dir(run: Path) -> Path:
    base = run / "archive" / f"rollback-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def restore(run: Path, target: Entry, entries: list[Entry]) -> Result:
    """Archive every checkpoint after ``target`` (and a different adapter/), then copy the target's
    adapter to ``<run>/adapter``. Call while holding the run's lock."""
    newer = [e for e in entries if e.step > target.step]
    adapter = run / ADAPTER_DIR
    stale_adapter = adapter.exists() and not _same_adapter(adapter, target.path)
    moved: list[str] = []
    archive = None
    if newer or stale_adapter:
        archive = _archive_dir(run)
        (archive / "checkpoints").mkdir(parents=True)
        for e in reversed(newer):  # newest first
            os.replace(e.path, archive / "checkpoints" / e.name)
            moved.append(f"checkpoints/{e.name}")
        if stale_adapter:
            os.replace(adapter, archive / ADAPTER_DIR)
            moved.append(ADAPTER_DIR)
        note = {"rolled_back_to": target.name, "step": target.step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "moved": moved}
        (archive / "rollback.json").write_text(json.dumps(note, indent=2) + "\n")
    if not adapter.exists():
        def copy(tmp: Path) -> None:
            for name in _adapter_files(target.path):
                shutil.copyfile(target.path / name, tmp / name)

        ckpt.atomic_dir(adapter, copy)
    return Result(target, archive, moved, adapter)


def rollback(run_dir: str | Path, to: str, log: Callable[[str], None] = print) -> Result:
    """Resolve ``to`` in ``run_dir`` and restore it, holding the run's lock (a live run: UserError)."""
    run = check_run_dir(run_dir)
    lock = RunLock(run, run_id=f"rollback-{os.getpid()}")
    try:
        lock.acquire(log)
    except UserError:
        raise UserError(f"{run} is in use by a live run ({_holder(run)}); stop it first (Ctrl-C saves a "
                        "checkpoint), then roll back") from None
    try:
        entries = scan(run)
        target = resolve(entries, to)
        return restore(run, target, entries)
    finally:
        lock.release()


def describe(run: Path, entries: list[Entry]) -> str:
    """The --list table: every checkpoint, whether it verifies, and the named targets."""
    if not entries:
        return f"{run}: no checkpoints yet"
    named = targets(entries)
    marks: dict[str, list[str]] = {}
    for name, e in named.items():
        marks.setdefault(e.name, []).append(name)
    rows = [("checkpoint", "step", "kind", "phase", "verifies", "targets / notes")]
    for e in entries:
        notes = list(marks.get(e.name, []))
        if e.tripped:
            notes.append("written after a breaker trip")
        rows.append((e.name, str(e.step), e.kind or "?", e.phase or "-", "yes" if e.valid else f"NO: {e.problem}",
                     ", ".join(notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"{run}: {len(entries)} checkpoint{'s' if len(entries) != 1 else ''}"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    lines.append(f"roll back with: swengine rollback {run} --to phase-N|step-N|best|last-good")
    return "\n".join(line.rstrip() for line in lines)


def listing(run_dir: str | Path) -> tuple[Path, list[Entry]]:
    run = check_run_dir(run_dir)
    return run, scan(run)


def done_words(run: Path, result: Result) -> str:
    """What happened and how to continue, for the CLI."""
    t = result.target
    what = f"rolled back {run} to {t.name} (step {t.step}" + (f", {t.phase}" if t.phase else "") + ")"
    if result.archive is None:
        what += ": it was already the newest checkpoint; adapter/ holds its weights"
    else:
        n = sum(m.startswith("checkpoints/") for m in result.moved)
        parts = [f"{n} later checkpoint{'s' if n != 1 else ''}"] if n else []
        if ADAPTER_DIR in result.moved:
            parts.append("the previous adapter/")
        what += f": archived {' and '.join(parts)} to {result.archive}; adapter/ now holds {t.name}'s weights"
    config = t.path / "config.yaml"
    return f"{what}\ncontinue with: swengine train {config if config.is_file() else '<config>'} --resume auto"
