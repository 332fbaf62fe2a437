"""The Trainer's context-extension phases: entering a phase (data packed at its length, its
micro-batch stream, checkpointing and LR schedule) and ending one (perplexity at every length so
far, the regression check, ``phases/phase-N``). See :mod:`swengine.train.phases`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from swengine.data.batches import BatchStream
from swengine.data.dataset import Prepared, prepare
from swengine.model.checkpointing import set_checkpointing
from swengine.train import checkpoint as ckpt
from swengine.train import phase_eval, phases
from swengine.train.schedule import build_scheduler


class PhasesMixin:
    @property
    def phase(self) -> phases.Phase:
        return self.phases[self.phase_index]

    @property
    def phased(self) -> bool:
        return bool(self.cfg.context.phases)

    def _enter_phase(self, index: int) -> None:
        """Data packed at the phase's length, its micro-batch stream, checkpointing setting and (once
        its steps are known) its LR schedule: warmup, then decay over the phase."""
        if index == self.phase_index:
            return
        self.phase_index = index
        p = self.phases[index]
        if self.data.max_seq_len != p.seq_len:
            self.data = self._prepare(p.seq_len)
        self.stream = BatchStream(self.data.train, p.micro_batch, self.cfg.seed, self.tokenizer.pad_token_id,
                                  self.cfg.data.shuffle, rank=self.dist.rank, world=self.dist.world)
        if p.checkpointing != self._checkpointing:
            set_checkpointing(self.model, p.checkpointing)
            self._checkpointing = p.checkpointing
        if p.steps:
            self.scheduler = self._phase_scheduler(p)
        if self.metrics is not None and self.phased:
            self.metrics.phase = p.name

    def _prepare(self, seq_len: int) -> Prepared:
        """The data packed (or truncated) at ``seq_len``: each phase trains at its own length."""
        data_cfg = dataclasses.replace(self.cfg.data, max_seq_len=seq_len)
        return prepare(data_cfg, self.tokenizer, *self.data_paths, self.cfg.seed, progress=self.cfg.logging.progress)

    def _phase_scheduler(self, p: phases.Phase):
        s = self.cfg.schedule
        return build_scheduler(self.optimizer, s.scheduler, min(s.warmup_steps, p.steps), p.steps, s.min_lr_ratio)

    def _end_phase(self) -> None:
        """Evaluate at this phase's length and every earlier one, flag a perplexity regression at
        the previous length, write ``<output_dir>/phases/phase-N`` (adapter, extended config,
        eval.json) and a step checkpoint kept from pruning; then enter the next phase."""
        p = self.phase
        lengths = [q.seq_len for q in self.phases[:self.phase_index + 1]]
        result = phase_eval.perplexities(self.model, phase_eval.eval_stream(self.data.eval or self.data.train),
                                         lengths, self.device)
        previous = self.phases[self.phase_index - 1] if self.phase_index else None
        regression = None
        if previous is not None:
            before = self.phase_evals.get(previous.name, {}).get(str(previous.seq_len))
            regression = phase_eval.regression(before, result.ppl[previous.seq_len])
        flagged = regression is not None and regression > self.cfg.context.max_ppl_regression
        ppl = {str(k): v for k, v in result.ppl.items()}
        self.phase_evals[p.name] = ppl
        self.metrics.log("phase_end", step=self.step, seq_len=p.seq_len, ppl=ppl, regression=regression,
                         flagged=flagged, repeated_eval_data=result.repeated)
        shown = ", ".join(f"{k}: {'n/a' if v is None else f'{v:.2f}'}" for k, v in ppl.items())
        self.log(f"{p.name} done at step {self.step} ({p.seq_len} tokens): perplexity {shown}")
        if self.monitor is not None:
            self._act(self.monitor.phase_end(p.name, regression, self.step))
        if flagged:
            self.log(f"warning: {p.name} made perplexity at {previous.seq_len} tokens {100 * regression:.0f}% worse "
                     f"than {previous.name} (context.max_ppl_regression={self.cfg.context.max_ppl_regression})")
        report = {"phase": p.name, "step": self.step, "seq_len": p.seq_len, "ppl": ppl, "regression": regression,
                  "flagged": flagged, "rope_scaling": self.cfg.context.rope_scaling}

        def write(tmp: Path) -> None:
            self._save_adapter(tmp)
            (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")

        ckpt.atomic_dir(self.out / "phases" / p.name, write)
        if self.phase_index + 1 < len(self.phases):
            self._enter_phase(self.phase_index + 1)
            self.save_checkpoint("phase", completed_phase=p.name)

