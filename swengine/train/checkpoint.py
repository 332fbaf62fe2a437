"""Atomic, verified checkpoints.

A checkpoint is written into a temporary directory (``.tmp-step-N-PID``), its files listed with
sizes and sha256 checksums in ``manifest.json`` (written last), everything fsynced, then renamed
into place: a ``step-N`` directory either is complete or does not exist. Before a checkpoint is
loaded its manifest is verified; one that fails is skipped, naming it, and ``--resume auto`` falls
back to the newest valid one. Removing a checkpoint renames it to ``.old-*`` first, so a visible
``step-N`` is never half deleted. Each holds the adapter (PEFT format), optimizer, scheduler,
grad-scaler and RNG states, the data position and the config."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
PREFIX = "step-"
DEBRIS = (".tmp-", ".old-")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(Exception):
    """A checkpoint that fails verification (missing, truncated or altered files)."""


class WriteFailed(Exception):
    """Writing ``final`` failed; its temporary was removed (``freed`` bytes)."""

    def __init__(self, final: Path, cause: OSError, freed: int):
        super().__init__(f"writing {final} failed: {cause}")
        self.final, self.cause, self.freed = final, cause, freed

    @property
    def no_space(self) -> bool:
        return self.cause.errno in NO_SPACE


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> dict:
    files = {}
    for root, _dirs, names in os.walk(directory):
        for name in sorted(names):
            p = Path(root) / name
            rel = p.relative_to(directory).as_posix()
            if rel == MANIFEST_NAME:
                continue
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": 1, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify(path: Path) -> None:
    """Raise CheckpointError (saying what is wrong) unless every file of the manifest is intact."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: no {MANIFEST_NAME} (incomplete or written by an older version)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path.name}: unreadable {MANIFEST_NAME} ({exc})") from None
    if STATE_NAME not in files:
        raise CheckpointError(f"{path.name}: the manifest does not list {STATE_NAME}")
    for rel, want in files.items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"{path.name}: {rel} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{path.name}: {rel} has {size} bytes, the manifest says {want['size']}")
        if sha256_file(p) != want["sha256"]:
            raise CheckpointError(f"{path.name}: {rel} fails its sha256 checksum")


def _remove(path: Path) -> None:
    """Rename out of sight first (``.old-*``), then delete: never a visible half-deleted directory."""
    old = path.parent / f".old-{path.name}-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    shutil.rmtree(old, ignore_errors=True)


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def atomic_dir(final: Path, write: Callable[[Path], None], manifest: bool = False) -> Path:
    """Create ``final`` by running ``write(tmpdir)`` and renaming: all or nothing. On any failure
    (an OSError such as ENOSPC, or an interruption) the temporary is removed and ``final``, if it
    existed, is left as it was; an OSError is raised as :class:`WriteFailed`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        if manifest:
            write_manifest(tmp)
        _fsync_tree(tmp)
    except BaseException as exc:
        full = _nearly_full(final.parent)
        freed = tree_size(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WriteFailed(final, exc, freed) from exc
        if isinstance(exc, Exception) and (full or "No space left" in str(exc)):
            # torch.save / safetensors report a full disk as RuntimeError ("unexpected pos ...")
            raise WriteFailed(final, OSError(errno.ENOSPC, "No space left on device"), freed) from exc
        raise
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def clean_debris(directory: Path, prefixes: tuple[str, ...] = DEBRIS) -> tuple[int, int]:
    """Remove ``.tmp-*``/``.old-*`` leftovers of killed runs (only call while holding the run lock).
    Returns (entries removed, bytes freed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0, 0
    count = freed = 0
    for p in directory.iterdir():
        if p.name.startswith(prefixes):
            if p.is_dir() and not p.is_symlink():
                freed += tree_size(p)
                shutil.rmtree(p, ignore_errors=True)
            else:
                freed += p.lstat().st_size
                p.unlink(missing_ok=True)
            count += 1
    return count, freed


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints under run_dir/checkpoints that have a manifest (not yet verified), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / MANIFEST_NAME).is_file()]
    return sorted(found, key=step_of)


def all_step_dirs(run_dir: Path) -> list[Path]:
    """Every step-N directory, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_NAME).read_text())


def newest_valid(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that passes verification; every one skipped is named in one line."""
    for p in reversed(all_step_dirs(run_dir)):
        try:
            verify(p)
        except CheckpointError as exc:
            log(f"skipping checkpoint {p}: {exc}")
            continue
        return p
    return None


def prune(run_dir: Path, keep_last: int, keep: set[Path], lineage: str | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and those in ``keep`` (e.g. the best).
    With ``lineage``, only checkpoints written by that run (resumes included) are candidates."""
    ckpts = list_checkpoints(run_dir)
    if lineage is not None:
        mine = []
        for p in ckpts:
            try:
                if read_state(p).get("lineage") == lineage:
                    mine.append(p)
            except (OSError, ValueError):
                continue
        ckpts = mine
    kept = {k.resolve() for k in keep}
    doomed = [p for p in ckpts[:-keep_last] if p.resolve() not in kept] if keep_last > 0 else []
    for p in doomed:
        _remove(p)
    return doomed
