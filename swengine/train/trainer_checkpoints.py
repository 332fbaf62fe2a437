"""The Trainer's checkpoints: atomic saves (adapter, optimizer, scheduler, scaler, RNG, data
position, phase, breaker state), verified loads, the compatibility check before a resume, and
which checkpoint ``--resume`` means. Formats and atomic writes: :mod:`swengine.train.checkpoint`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from swengine.errors import UserError
from swengine.model.adapter import load_adapter_into, save_adapter
from swengine.model.load import save_extended_config
from swengine.train import checkpoint as ckpt
from swengine.train.stops import HardStop

# Settings a checkpoint cannot be resumed under when they differ (shapes or meaning of the state).
RESUME_KEYS = (("lora", "rank"), ("lora", "targets"), ("lora", "alpha"), ("lora", "use_rslora"), ("optim", "name"))


class CheckpointsMixin:
    def _save_adapter(self, directory: Path) -> None:
        if self.handle is not None:
            save_adapter(self.handle, self.spec, directory, self.model_path)
        else:
            self.model.save_pretrained(str(directory))
        if self.cfg.context.rope_scaling:
            # the extended base config (rope parameters, max positions): transformers and `swengine
            # merge` load the base with it, so the adapter gives the logits it was trained with
            save_extended_config(self.model_config, directory)

    def save_checkpoint(self, kind: str = "periodic", **extra) -> Path:
        with self._full_parameters():  # FSDP2: the full adapter and optimizer state (every rank joins)
            optimizer_state = self._optimizer_state()
            if not self.dist.main:  # data parallel: rank 0 writes; the others keep the same bookkeeping
                path = self.out / "checkpoints" / ckpt.checkpoint_name(self.step)
                self._last_ckpt, self._last_ckpt_step, self._tripped = path, self.step, False
                return path
            self._saving = True
            try:
                return self._save_checkpoint(kind, extra, optimizer_state)
            finally:
                self._saving = False

    def _optimizer_state(self) -> dict:
        if not self.sharded:
            return self.optimizer.state_dict()
        from swengine.train import fsdp

        return fsdp.full_optimizer_state(self.optimizer)

    def _save_checkpoint(self, kind: str, extra: dict, optimizer_state: dict) -> Path:
        final = self.out / "checkpoints" / ckpt.checkpoint_name(self.step)

        def write(tmp: Path) -> None:
            self._save_adapter(tmp)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(ckpt.rng_state(), tmp / "rng.pt")
            (tmp / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            state = {"step": self.step, "total_steps": self.total_steps, "data": self.stream.state_dict(),
                     "best_eval": None if math.isinf(self.best_eval) else self.best_eval,
                     "best_path": str(self.best_path) if self.best_path else None, "kind": kind,
                     "lineage": self.lineage, "run_id": self.run_id, "phase_index": self.phase_index,
                     "phase_evals": self.phase_evals, "tripped": self._tripped,
                     "breaker": self.breaker.state_dict() if self.monitor is not None else None, **extra}
            if self.phased:
                state["phase"] = self.phase.name
            (tmp / ckpt.STATE_NAME).write_text(json.dumps(state, indent=2))

        path = ckpt.atomic_dir(final, write, manifest=True)
        self._last_ckpt, self._last_ckpt_step = path, self.step
        self._tripped = False
        keep = {self.best_path} if (self.best_path and self.cfg.checkpointing.keep_best) else set()
        keep.add(path)
        keep |= {c for c in ckpt.list_checkpoints(self.out) if ckpt.read_state(c).get("kind") == "phase"}
        ckpt.prune(self.out, self.cfg.checkpointing.keep_last, keep, lineage=self.lineage)
        self.metrics.log("checkpoint", step=self.step, path=str(path), kind=kind)
        self.metrics.sync()
        return path

    def _check_compatible(self, path: Path) -> None:
        try:
            theirs = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return
        ours = self.cfg.to_dict()
        for section, key in RESUME_KEYS:
            a, b = (theirs.get(section) or {}).get(key), ours[section][key]
            if a is not None and a != b:
                raise UserError(f"checkpoint {path} was written with {section}.{key}={a}, this run has "
                                f"{section}.{key}={b}; resume with {section}.{key}={a}, or start over with "
                                "--overwrite (the old run is archived)")

    def load_checkpoint(self, path: Path) -> None:
        self._check_compatible(path)
        try:
            self._load_checkpoint(path)
        except (UserError, HardStop):
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise UserError(f"cannot load checkpoint {path}: {type(exc).__name__}: {detail}") from None

    def _load_checkpoint(self, path: Path, rollback: bool = False) -> None:
        state = ckpt.read_state(path)
        if self.sharded:
            from swengine.train import fsdp

            fsdp.load_adapter(self.handle, path)
        elif self.handle is not None:
            load_adapter_into(self.handle, path)
        else:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        # the phase first: a new schedule sets the optimizer's lr, which the loaded state then replaces
        self._enter_phase(int(state.get("phase_index", 0)))
        self.phase_evals = state.get("phase_evals") or {}
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
        if self.sharded:
            fsdp.load_optimizer_state(self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if self.scaler is not None and (path / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
        ckpt.set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.best_eval = state["best_eval"] if state["best_eval"] is not None else math.inf
        self.best_path = Path(state["best_path"]) if state.get("best_path") else None
        self.lineage = state.get("lineage") or self.lineage
        self._last_ckpt, self._last_ckpt_step = path, self.step
        if not rollback and self.monitor is not None and state.get("breaker"):
            self.breaker.load_state_dict(state["breaker"])

    def _resume_path(self) -> Path | None:
        if not self.resume:
            return None
        if self.resume == "auto":
            return ckpt.newest_valid(self.out, self.log)
        p = Path(self.resume)
        if not (p / ckpt.STATE_NAME).is_file():
            raise UserError(f"--resume {self.resume}: not a checkpoint directory (no {ckpt.STATE_NAME})")
        try:
            ckpt.verify(p)
        except ckpt.CheckpointError as exc:
            raise UserError(f"--resume {self.resume}: checkpoint fails verification: {exc}; use --resume auto "
                            "to take the newest valid one") from None
        return p

