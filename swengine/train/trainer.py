"""The training loop: plain PyTorch, no HF Trainer.

setup (seeds, device, dtype, data, model, patch, optimizer, schedule) → steps of gradient
accumulation (:mod:`swengine.train.step`) → telemetry every ``logging.every`` steps, eval every
``logging.eval_every``, atomic checkpoints every ``checkpointing.save_every`` (and on SIGINT or
SIGTERM, at the next optimizer-step boundary), the final adapter in PEFT format under
``<output_dir>/adapter``.

A run owns its output_dir (:mod:`swengine.train.lock`): a second live run is refused, a used
directory needs ``--resume`` or ``--overwrite`` (which archives the old run). Checkpoints are
verified before loading (:mod:`swengine.train.checkpoint`); a full disk ends the run with exit 3
and the last checkpoint intact (:mod:`swengine.train.stops`).

The class is split by concern: context phases (:mod:`swengine.train.trainer_phases`), checkpoint
save/load (:mod:`swengine.train.trainer_checkpoints`) and the circuit-breaker glue
(:mod:`swengine.train.trainer_breaker`); the loop, signals and the output directory stay here.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swengine.config import TrainConfig
from swengine.data.batches import eval_batches, padding_ratio
from swengine.errors import UserError
from swengine.model import load as model_load
from swengine.model.build import build_training_model
from swengine.model.patch import LoraSpec
from swengine.telemetry import MetricsLogger
from swengine.train import checkpoint as ckpt
from swengine.train import phases
from swengine.train.distill import Distiller
from swengine.train.distributed import Dist, NoLock, PeerLost, QuietMetrics, check_supported
from swengine.train.lock import RunLock, check_output_dir, new_run_id
from swengine.train.optim import build_optimizer
from swengine.train.step import (
    apply_update,
    autocast_context,
    causal_lm_loss,
    clip_gradients,
    discard_update,
    forward_backward,
    label_tokens,
)
from swengine.train.stops import FAILED, HardStop, RunStopped
from swengine.train.trainer_breaker import BreakerMixin
from swengine.train.trainer_checkpoints import CheckpointsMixin
from swengine.train.trainer_phases import PhasesMixin

RUN_FILES = ("checkpoints", "metrics.jsonl", "adapter", "tensorboard")  # what --overwrite archives


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _filesystem(path: Path) -> str:
    """'SOURCE (MOUNTPOINT)' of the filesystem holding path, for disk-full messages."""
    try:
        p = Path(path).resolve()
        while not p.exists():
            p = p.parent
        dev = p.stat().st_dev
        while p.parent != p and p.parent.stat().st_dev == dev:
            p = p.parent
        source = None
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1] == str(p):
                    source = parts[0]
        return f"{source} ({p})" if source else str(p)
    except OSError:
        return str(path)


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    tokens_per_second: float
    skill_before: float | None = None
    skill_after: float | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation, or the process's peak RSS (0 where the OS has no getrusage)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource  # POSIX only
    except ImportError:
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


class Trainer(PhasesMixin, CheckpointsMixin, BreakerMixin):
    def __init__(self, cfg: TrainConfig, resume: str | None = None, log=print, overwrite: bool = False,
                 explicit: set[str] | frozenset = frozenset(), plan_for=None, dist: Dist | None = None):
        """``explicit``: config keys the user wrote; ``plan_for(seq_len) -> PhaseSetup``: the
        planner's micro-batch / accumulation / checkpointing per phase length (--auto); ``dist``:
        this process's rank in a torchrun group (:mod:`swengine.train.distributed`; default one
        process). Only rank 0 writes and prints; every rank takes part in every collective."""
        self.cfg, self.resume, self.log, self.overwrite = cfg, resume, log, overwrite
        self.dist = dist or Dist()
        self._agreed_signal = 0  # data parallel: a signal some rank received, agreed at the last step
        self.explicit, self.plan_for = explicit, plan_for
        self.out = Path(cfg.output_dir)
        self.run_id = new_run_id()
        self.lineage = self.run_id  # kept across resumes: the checkpoints this run may prune
        self.metrics = None
        self._signals: list[int] = []
        self._saving = False
        self._last_ckpt: Path | None = None
        self._last_ckpt_step: int | None = None
        self._resumed_from: Path | None = None
        self._in_update = False
        self.monitor = self.alerts = None  # the circuit breaker (_setup_breaker, once telemetry is open)
        self._tripped = False
        self._rollbacks = 0  # in-run rollbacks carried out

    def progress(self, message: str) -> None:
        """Per-step lines (train loss, eval loss); logging.progress=false keeps only notices."""
        if self.cfg.logging.progress:
            self.log(message)

    # ------------------------------------------------------------------ setup
    def _data_paths(self) -> tuple[str, str, bool]:
        d = self.cfg.data
        if d.mix:  # the sources are data.mix's (prepare refuses data.train beside it)
            return d.train, d.eval, False
        if not d.train:
            if self.cfg.model.path:
                raise UserError("data.train is empty; set data.train=<file> (the demo dataset goes with the demo model)")
            return str(model_load.DEMO_TRAIN), d.eval or str(model_load.DEMO_EVAL), True
        return d.train, d.eval, False

    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.device = model_load.resolve_device(cfg.device)
        if self.dist.active:
            check_supported(cfg)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
        self.dtype = model_load.resolve_dtype(cfg.model.dtype, self.device)
        self.model_path = model_load.model_path(cfg.model.path)
        train_path, eval_path, self.is_demo = self._data_paths()
        config = model_load.load_config(self.model_path, cfg.data.max_seq_len, cfg.context.rope_scaling,
                                        extending=bool(cfg.context.phases))
        self.model_config = config
        self.tokenizer = model_load.load_tokenizer(self.model_path)
        self.data_paths = (train_path, eval_path)
        self.phases = phases.resolve(cfg, self.explicit, self.plan_for)
        self.data = self._prepare(self.phases[0].seq_len)  # before the model: bad data fails fast
        self.spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets),
                             cfg.lora.use_rslora)
        quant = ("nf4-dq" if cfg.quantization.double_quant else "nf4") if cfg.quantization.load_in_4bit else "none"
        built = build_training_model(config, self.spec, dtype=self.dtype, device=self.device, weights=self.model_path,
                                     quant=quant, impl=cfg.lora.impl, attention=cfg.model.attention,
                                     checkpointing=cfg.checkpointing.gradient_checkpointing,
                                     strict_kernels=cfg.model.strict_kernels)
        self.model, self.handle, self.params = built.model, built.handle, built.params
        self.dist.broadcast_params(self.params)
        if self.sharded:
            from swengine.train import fsdp

            self.params = fsdp.shard_model(self.model)
        self.distiller = Distiller.create(cfg, self) if (cfg.distill.teacher or cfg.distill.cache) else None
        self._checkpointing = cfg.checkpointing.gradient_checkpointing
        self.autocast = self.dtype if self.device.type == "cuda" and self.dtype != torch.float32 else None
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 and self.device.type == "cuda" else None
        o = cfg.optim
        self.optimizer = build_optimizer(self.params, o.name, lr=o.lr, weight_decay=o.weight_decay,
                                         betas=tuple(o.betas), eps=o.eps)
        self.phase_index = -1
        self._enter_phase(0)
        s = cfg.schedule
        p0 = self.phases[0]
        default_steps = (math.ceil(s.epochs * self.stream.batches_per_epoch / p0.grad_accumulation)
                         if s.epochs > 0 else s.max_steps)
        phases.with_steps(self.phases, default_steps)
        self.total_steps = sum(p.steps for p in self.phases)
        self.scheduler = self._phase_scheduler(p0)
        self.phase_evals: dict[str, dict] = {}  # phase name → its end-of-phase perplexities
        self.step = 0
        self.best_eval = math.inf
        self.best_path: Path | None = None

    # ------------------------------------------------------------------ the output directory
    def _claim_output_dir(self) -> None:
        """Lock output_dir, clean debris of killed runs, refuse or archive a previous run (rank 0;
        the other ranks wait for it and take its run id)."""
        if not self.dist.active:
            return self._claim_output_dir_here()
        failed = None
        if self.dist.main:
            try:
                self._claim_output_dir_here()
            except BaseException as exc:
                failed = exc
        else:
            self.lock = NoLock()
        self.run_id, ok = self.dist.broadcast_object((self.run_id, failed is None), "waiting for rank 0 to claim "
                                                     f"{self.out}")
        self.lineage = self.run_id
        if failed is not None:
            raise failed
        if not ok:
            raise RunStopped(f"rank {self.dist.rank}: rank 0 could not start the run (its error says why)", 2)

    def _shard_summary(self) -> str:
        """FSDP2: how much of the frozen base one rank holds (e.g. NF4 packed bytes split N ways)."""
        if not self.sharded:
            return ""
        from swengine.train import fsdp

        local, full = fsdp.frozen_bytes(self.model)
        return f"; base weights per rank {local / 2**20:.1f} of {full / 2**20:.1f} MiB"

    @property
    def sharded(self) -> bool:
        """FSDP2: the base model's decoder is sharded over the ranks (:mod:`swengine.train.fsdp`)."""
        return self.dist.active and self.dist.strategy == "fsdp"

    def _full_parameters(self):
        """Full parameters on every rank inside (FSDP2: an all-gather every rank joins)."""
        if not self.sharded:
            return contextlib.nullcontext()
        from swengine.train import fsdp

        return fsdp.full_parameters(self.model)

    def _claim_output_dir_here(self) -> None:
        check_output_dir(self.out)
        self.lock = RunLock(self.out, self.run_id)
        self.lock.acquire(self.log)
        try:
            self._clean_and_check()
        except BaseException:
            self.lock.release()
            raise

    def _clean_and_check(self) -> None:
        n1, f1 = ckpt.clean_debris(self.out / "checkpoints")
        n2, f2 = ckpt.clean_debris(self.out, (".tmp-adapter-", ".old-adapter-"))
        if n1 + n2:
            self.log(f"removed {n1 + n2} stale temporary checkpoint director{'y' if n1 + n2 == 1 else 'ies'} "
                     f"({_mb(f1 + f2)}) left by an interrupted run")
        used = [name for name in RUN_FILES if self._holds(name)]
        if self.overwrite:
            if self.resume:
                raise UserError("--overwrite starts a new run and --resume continues one; use one of them")
            if used:
                archive = self.out / "archive" / time.strftime("%Y%m%d-%H%M%S")
                while archive.exists():
                    archive = archive.with_name(archive.name + "-1")
                archive.mkdir(parents=True)
                for name in used:
                    os.replace(self.out / name, archive / name)
                self.log(f"--overwrite: the previous run ({', '.join(used)}) was archived to {archive}")
        elif used and not self.resume:
            found = ckpt.all_step_dirs(self.out)
            what = f"checkpoints up to {found[-1].name}" if found else ", ".join(used)
            raise UserError(f"output_dir {self.out} already holds a run ({what}); continue it with --resume auto, "
                            "or start over with --overwrite (the old run is archived, not deleted)")

    def _holds(self, name: str) -> bool:
        p = self.out / name
        if name == "checkpoints":
            return p.is_dir() and any(c.name.startswith(ckpt.PREFIX) for c in p.iterdir())
        if name == "metrics.jsonl":
            return p.is_file() and p.stat().st_size > 0
        return p.exists()

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGINT/SIGTERM: finish the current optimizer step, save a checkpoint, exit 128+signum.
        A second signal waits for that; a third abandons it (the previous checkpoint stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, _frame) -> None:
        self._signals.append(signum)
        name = signal.Signals(signum).name
        if len(self._signals) >= 3:
            raise HardStop(self._signals[0])
        if len(self._signals) == 1:
            msg = (f"{name}: finishing the current step, then saving a checkpoint (a third signal abandons "
                   "the save and keeps the previous checkpoint)")
        else:
            msg = (f"{name}: still {'saving the checkpoint' if self._saving else 'finishing the step'}, please "
                   "wait; once more abandons it and keeps the previous checkpoint")
        try:
            if self.dist.main:
                os.write(2, (msg + "\n").encode())  # not print(): a handler may interrupt a print
        except OSError:
            pass

    def _last_checkpoint_words(self) -> str:
        found = ckpt.list_checkpoints(self.out)
        last = found[-1] if found else self._last_ckpt
        return f"the last checkpoint {last.name} is intact" if last else "no checkpoint had been saved yet"

    def _end(self, status: str, **fields) -> None:
        """run_end and close, best effort (the disk may be full)."""
        if self.metrics is None:
            return
        record = {"event": "run_end", "step": self.step, "status": status, **fields}
        try:
            record = self.metrics.log("run_end", step=self.step, status=status, **fields)
        except OSError:
            pass
        if getattr(self, "alerts", None) is not None:
            if status != "completed":
                self.alerts.send(record)
            self.alerts.close()
        self.metrics.close()
        self.metrics = None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.eval:
            return None
        was = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        split = self.dist.active and not self.sharded  # FSDP2: each forward is a collective: all run all
        for i, batch in enumerate(eval_batches(self.data.eval, self.phase.micro_batch, self.tokenizer.pad_token_id)):
            if split and i % self.dist.world != self.dist.rank:  # data parallel: each rank its share
                continue
            n = label_tokens(batch)
            batch = {k: v.to(self.device) for k, v in batch.items() if k != "real_tokens"}
            with autocast_context(self.device.type, self.autocast):
                loss = causal_lm_loss(self.model, batch, self.cfg.fused_loss)
            total += float(loss) * n
            count += n
        self.model.train(was)
        if split:
            total, count = self.dist.sum([total, count], self.device, "the evaluation sum")
        return total / max(count, 1)

    def skill_accuracy(self) -> float | None:
        """Exact match of greedy answers on the demo's held-out task (the before/after number)."""
        if not self.is_demo:
            return None
        from swengine.data.records import read_records
        from swengine.demo.skill import exact_match

        rows = read_records(str(model_load.DEMO_EVAL))[:50]
        return exact_match(self.model, self.tokenizer, rows)

    # ------------------------------------------------------------------ loop
    def run(self) -> RunResult:
        self._claim_output_dir()
        try:
            with self._signal_handlers():
                try:
                    return self._run()
                except HardStop as stop:
                    self._end("interrupted")
                    name = signal.Signals(stop.signum).name
                    raise RunStopped(f"stopped by a third {name} at step {self.step}: nothing more was saved; "
                                     f"{self._last_checkpoint_words()}", 128 + stop.signum) from None
                except ckpt.WriteFailed as exc:
                    self._end("failed")
                    raise RunStopped(self._write_failed_words(exc), FAILED) from None
                except torch.OutOfMemoryError:
                    self._end("failed", reason="out_of_memory")
                    raise RunStopped(f"error: out of GPU memory at step {self.step + 1}: {self._oom_hint()}; "
                                     f"{self._last_checkpoint_words()}", FAILED) from None
                except OSError as exc:
                    if exc.errno not in ckpt.NO_SPACE:
                        raise
                    self._end("failed")
                    raise RunStopped(f"error: no space left on {_filesystem(self.out)}: freed 0.0 MB of partial "
                                     f"output; {self._last_checkpoint_words()}", FAILED) from None
                except PeerLost as exc:
                    self._end("failed", reason="rank_lost")
                    raise RunStopped(f"error: {exc} at step {self.step + 1}; {self._last_checkpoint_words()}",
                                     FAILED) from None
                except BaseException:
                    self._end("failed")
                    raise
        finally:
            self.lock.release()

    def _write_failed_words(self, exc: ckpt.WriteFailed) -> str:
        if exc.no_space:
            return (f"error: no space left on {_filesystem(exc.final)}: freed {_mb(exc.freed)} of partial output; "
                    f"{self._last_checkpoint_words()}")
        return (f"error: writing {exc.final} failed ({exc.cause.strerror or exc.cause}); removed its partial "
                f"output ({_mb(exc.freed)}); {self._last_checkpoint_words()}")

    def _run(self) -> RunResult:
        self.setup()
        tb = self.out / "tensorboard" if self.cfg.logging.tensorboard else None
        resume_from = self._resumed_from = self._resume_path()
        self.metrics = (MetricsLogger(self.out / "metrics.jsonl", tb, run_id=self.run_id, log=self.log)
                        if self.dist.main else QuietMetrics(self.dist.rank))
        if self.phased:
            self.metrics.phase = self.phase.name
        self._setup_breaker()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.log(f"resumed from {resume_from} at step {self.step}")
        elif self.resume == "auto":
            bad = ckpt.all_step_dirs(self.out)
            self.log(f"--resume auto: no valid checkpoint ({len(bad)} skipped), starting fresh" if bad
                     else "--resume auto: no checkpoint yet, starting fresh")
        n_params = sum(p.numel() for p in self.params)
        self.metrics.log("run_start", step=self.step, model=self.model_path, device=str(self.device),
                         dtype=str(self.dtype).replace("torch.", ""), trainable_params=n_params,
                         total_steps=self.total_steps, train_rows=len(self.data.train), eval_rows=len(self.data.eval),
                         data_format=self.data.format, resumed_from=str(resume_from) if resume_from else None,
                         lineage=self.lineage, pid=os.getpid(), truncated_records=self.data.truncated,
                         dropped_records=self.data.dropped, malformed_records=self.data.malformed,
                         padding_ratio=padding_ratio(self.data.train), data_cache=self.data.cache,
                         data_mix=dict(self.data.mix), world_size=self.dist.world,
                         config=self.cfg.to_dict())
        if self.distiller is not None:
            self.log(self.distiller.describe())
        if self.phased:
            self.log(f"context extension to {self.phases[-1].seq_len} tokens with rope_scaling "
                     f"{self.cfg.context.rope_scaling or '(the model config)'}: {phases.describe(self.phases)}")
        lengths = "".join(f"; {part}" for part in (self.data.length_summary, self.data.mix_summary, self.data.cache)
                          if part)
        self.log(f"{self.model_path}: {n_params:,} trainable LoRA parameters (rank {self.spec.rank}), "
                 f"{len(self.data.train)} training rows ({self.data.format}, {100 * padding_ratio(self.data.train):.1f}% "
                 f"padding{lengths}), {self.total_steps} steps on "
                 f"{self.device} in {str(self.dtype).replace('torch.', '')}"
                 + (f", {'FSDP2' if self.sharded else 'data parallel'} over {self.dist.world} ranks (global batch "
                    f"{self.dist.world} × {self.phase.micro_batch} × {self.phase.grad_accumulation})"
                    if self.dist.active else "") + self._shard_summary())
        skill_before = self.skill_accuracy() if resume_from is None else None
        first_eval = self.evaluate() if resume_from is None else None
        if first_eval is not None:
            self.metrics.log("eval", step=self.step, eval_loss=first_eval)
            self.progress(f"step {self.step}: eval loss {first_eval:.4f}")
        status, last_loss, last_eval = "completed", None, first_eval
        tokens_seen, start = 0, time.perf_counter()
        window_loss, window_tokens, window_start = [], 0, time.perf_counter()
        try:
            while self.step < self.total_steps:
                if self._pending_signal():
                    self._stop_for_signal(last_loss, last_eval)
                rollbacks = self._rollbacks
                loss, tokens, norm = self._train_step()  # counts the step once it is complete
                tokens_seen += tokens
                if self._rollbacks != rollbacks:  # the step was undone: its breaker event tells it
                    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
                    continue
                window_loss.append(loss)
                window_tokens += tokens
                if self.step % self.cfg.logging.every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    last_loss = sum(window_loss) / len(window_loss)
                    tps = window_tokens / max(elapsed, 1e-9)
                    peak = peak_memory_bytes(self.device)
                    parts = {}
                    if self.distiller is not None:  # this step's CE and KD parts
                        parts = dict(zip(("ce_loss", "kd_loss"), self.distiller.step_parts(), strict=True))
                    self.metrics.log("train", step=self.step, epoch=self.stream.epoch, loss=last_loss,
                                     lr=self.scheduler.get_last_lr()[0], grad_norm=norm, tokens=window_tokens,
                                     tokens_per_second=tps, peak_memory_bytes=peak, memory_kind=(
                                         "cuda_allocated" if self.device.type == "cuda" else "process_rss"), **parts)
                    eta = (self.total_steps - self.step) * elapsed / max(len(window_loss), 1)
                    shown = (f" (ce {parts['ce_loss']:.4f}, kd {parts['kd_loss']:.4f})"
                             if parts.get("ce_loss") is not None else "")
                    self.progress(f"step {self.step}/{self.total_steps}  loss {last_loss:.4f}{shown}  lr "
                             f"{self.scheduler.get_last_lr()[0]:.2e}  {tps:,.0f} tok/s  peak "
                             f"{peak / 2**20:,.0f} MiB  ETA {eta:.0f}s")
                    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
                if self.cfg.logging.eval_every and self.step % self.cfg.logging.eval_every == 0:
                    last_eval = self._eval_and_track()
                if self.phased and self.step == phases.start_of(self.phases, self.phase_index + 1):
                    self._end_phase()  # the boundary checkpoint is saved in the next phase
                if self.cfg.checkpointing.save_every and self.step % self.cfg.checkpointing.save_every == 0 \
                        and self.step < self.total_steps and self._last_ckpt_step != self.step:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            # Only without our handler (not the main thread). Inside a step's forward/backward the
            # step was rolled back; between steps the state is a step boundary: save and stop. In
            # the optimizer update the parameters may be half updated, so nothing is saved.
            if self._in_update:
                self._end("interrupted")
                raise RunStopped(f"interrupted during the optimizer update of step {self.step + 1}: not saved; "
                                 f"{self._last_checkpoint_words()}", 130) from None
            self._signals.append(signal.SIGINT)
            self._stop_for_signal(last_loss, last_eval)
        if self.cfg.logging.eval_every == 0 or self.step % self.cfg.logging.eval_every:
            last_eval = self._eval_and_track()
        self.save_checkpoint("final")
        adapter_dir = self.out / "adapter"
        with self._full_parameters():
            if self.dist.main:
                ckpt.atomic_dir(adapter_dir, self._save_adapter)
        self.dist.barrier("waiting for rank 0 to write the adapter")
        skill_after = self.skill_accuracy() if skill_before is not None else None
        elapsed = time.perf_counter() - start
        self._end(status, train_loss=last_loss, eval_loss=last_eval, skill_before=skill_before,
                  skill_after=skill_after)
        return RunResult(self.out, adapter_dir, self.step, last_loss, last_eval, first_eval,
                         tokens_seen / max(elapsed, 1e-9), skill_before, skill_after)

    def _pending_signal(self) -> int:
        """The signal to stop for at this step boundary (0: none). Data parallel: the one the ranks
        agreed on at the end of the last step, so all of them stop at the same step."""
        if self.dist.active:
            return self._agreed_signal
        return self._signals[0] if self._signals else 0

    def _stop_for_signal(self, last_loss: float | None, last_eval: float | None) -> None:
        """At an optimizer-step boundary: save (unless this step is saved already) and stop."""
        signum = self._pending_signal() or signal.SIGINT
        if self._last_ckpt_step == self.step or (self._last_ckpt_step is None and self.step == 0):
            path = self._last_ckpt  # nothing new since the last checkpoint (or since the start)
        else:
            path = self.save_checkpoint("interrupted")
        self._end("interrupted", train_loss=last_loss, eval_loss=last_eval)
        name = signal.Signals(signum).name
        where = f"checkpoint {path} saved" if path else "no step had run, nothing to save"
        if path is not None and path == self._resumed_from:
            where = f"no step had run since {path}"
        raise RunStopped(f"stopped by {name} at step {self.step}: {where}; continue with --resume auto",
                         128 + signum)

    def _eval_and_track(self) -> float | None:
        loss = self.evaluate()
        if loss is None:
            return None
        self.metrics.log("eval", step=self.step, eval_loss=loss)
        self.progress(f"step {self.step}: eval loss {loss:.4f}")
        if self.monitor is not None:
            self._act(self.monitor.eval(self.step, loss, phase=self.phase.name if self.phased else None))
        if loss < self.best_eval and self.step < self.total_steps:
            self.best_eval = loss
            self.best_path = self.save_checkpoint("best")
        return loss

    def _train_step(self) -> tuple[float, int, float | None]:
        """One optimizer step over ``grad_accumulation`` micro-batches, every label token weighted
        alike. Micro-batch losses stay on the device; the step's loss is read once, at the end."""
        if self.dist.active:  # each rank its own dropout masks, a function of (seed, step, rank): resumable
            torch.manual_seed((self.cfg.seed * 1_000_003 + self.step) * self.dist.world + self.dist.rank)
        data_before, rng_before = self.stream.state_dict(), ckpt.rng_state()
        started = time.perf_counter()  # this step's own time: evals and saves are not throughput
        try:
            batches, rows = [], []
            for _ in range(self.phase.grad_accumulation):
                batches.append(self.stream.next())
                rows.append(self.stream.last_rows)
            num_items = sum(label_tokens(b) for b in batches)
            tokens = sum(int(b.pop("real_tokens")) for b in batches)
            if self.dist.active:  # the global batch's label tokens: every token weighs alike on every rank
                num_items, tokens = map(int, self.dist.sum([num_items, tokens], self.device, "the token count"))
            num_items = max(num_items, 1)
            total = None
            if self.distiller is not None:
                logging_step = (self.step + 1) % self.cfg.logging.every == 0 or self.step + 1 == self.total_steps
                self.distiller.start_step(parts=logging_step)
            for batch, batch_rows in zip(batches, rows, strict=True):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss_fn = self.distiller.loss_fn(batch_rows) if self.distiller is not None else None
                loss = forward_backward(self.model, batch, autocast_dtype=self.autocast, scaler=self.scaler,
                                        fused_loss=self.cfg.fused_loss, num_items=num_items, loss_fn=loss_fn)
                total = loss if total is None else total + loss
        except KeyboardInterrupt:
            self.stream.load_state_dict(data_before)
            ckpt.set_rng_state(rng_before)
            self.optimizer.zero_grad(set_to_none=True)
            raise  # the step is undone (data position, RNG, gradients): a checkpoint now resumes exactly
        total = self.dist.sync_grads(self.params, total)
        norm_t = clip_gradients(self.optimizer, self.params, max_grad_norm=self.cfg.optim.max_grad_norm,
                                scaler=self.scaler)
        if hasattr(norm_t, "full_tensor"):  # FSDP2: the norm over every rank's shards
            norm_t = norm_t.full_tensor()
        loss, norm = float(total), float(norm_t)  # the step's one host sync
        elapsed, peak = time.perf_counter() - started, peak_memory_bytes(self.device)
        if self.dist.active:  # the same inputs on every rank: the same breaker decisions, the same stop
            agreed, elapsed, peak = self.dist.max([self._signals[0] if self._signals else 0, elapsed, peak],
                                                  self.device)
            self._agreed_signal = int(agreed)
        decision = None
        if self.monitor is not None:  # the circuit breaker sees the step before it is applied
            decision = self.monitor.step(self.step + 1, loss, norm, tokens / max(elapsed, 1e-9), int(peak),
                                         self.vram_total, phase=self.phase.name if self.phased else None)
        self._in_update = True
        if decision is not None and decision.action in ("skip", "rollback", "stop"):
            discard_update(self.optimizer, self.scaler)
        else:
            apply_update(self.optimizer, self.scaler)
        self.scheduler.step()
        self.step += 1
        self._in_update = False
        self._act(decision)
        return loss, tokens, norm
