"""Atomic checkpoints: written into a temporary directory, fsynced, then renamed into place, so a
checkpoint directory either is complete or does not exist. Each holds the adapter (PEFT format),
optimizer, scheduler, grad-scaler and RNG states, the data position and the config."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

STATE_NAME = "trainer_state.json"
PREFIX = "step-"


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Create ``final`` by running ``write(tmpdir)`` and renaming: all or nothing."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


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


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under run_dir/checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_NAME).read_text())


def prune(run_dir: Path, keep_last: int, keep: set[Path]) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and those in ``keep`` (e.g. the best)."""
    ckpts = list_checkpoints(run_dir)
    doomed = [p for p in ckpts[:-keep_last] if p.resolve() not in {k.resolve() for k in keep}]
    for p in doomed:
        shutil.rmtree(p)
    return doomed
