"""The Trainer's circuit-breaker glue: ``safety.*`` → the breaker (:mod:`swengine.safety`), acting
on its decisions (lower the LR, roll back to the last good checkpoint, stop), and the
out-of-memory advice."""

from __future__ import annotations

import torch

from swengine.train import checkpoint as ckpt
from swengine.train.stops import FAILED, RunStopped


class BreakerMixin:
    def _oom_hint(self) -> str:
        """What fits instead: the planner's setup for this GPU at this length (best effort: the
        failure path must not fail), else the general advice."""
        general = ("lower schedule.micro_batch_size or data.max_seq_len, turn on checkpointing.gradient_checkpointing, "
                   "or let the planner choose (--auto)")
        if self.device.type != "cuda":
            return general
        try:
            from swengine.planner.cli import make_plan

            torch.cuda.empty_cache()
            plan = make_plan(self.model_path, vram_gib=self.vram_total / 2**30, seq_len=self.phase.seq_len,
                             batch=self.phase.micro_batch * self.phase.grad_accumulation, rank=self.spec.rank)
            s = plan.setup
            if not plan.fits:
                return f"{general} (the planner finds nothing that fits this GPU at {self.phase.seq_len} tokens)"
            return (f"the planner's setup for this GPU: micro-batch {s.micro_batch} × schedule.grad_accumulation "
                    f"{plan.grad_accumulation}, checkpointing {'on' if s.checkpointing else 'off'}, base "
                    f"{'bf16' if s.quant == 'none' else s.quant} (swengine train ... --auto applies it)")
        except Exception:  # noqa: BLE001  (only advice)
            return general

    def _setup_breaker(self) -> None:
        """safety.* → the breaker, its telemetry/print/alert glue (swengine/safety); None when off."""
        self.monitor = self.alerts = None
        self._tripped = False  # a trip more than a warning since the last checkpoint
        self.vram_total = (torch.cuda.get_device_properties(self.device).total_memory
                           if self.device.type == "cuda" else None)
        if not self.cfg.safety.enabled:
            return
        from swengine.config import safety_rules
        from swengine.safety.alerts import AlertRunner
        from swengine.safety.monitor import Monitor
        from swengine.safety.rules import Breaker, SafetyRules

        self.breaker = Breaker(safety_rules(self.cfg, SafetyRules))
        if self.cfg.safety.on_alert and self.dist.main:  # one alert per trip, not one per rank
            self.alerts = AlertRunner(self.cfg.safety.on_alert, log=self.log)
        self.monitor = Monitor(self.breaker, self.metrics, self.log, self.alerts)

    def _act(self, decision) -> None:
        """Carry out a breaker decision: lower the LR, roll back to the last good checkpoint (the
        data stream moves on: replaying the batches that tripped would trip again), or stop."""
        if decision is None or decision.action in (None, "warn", "skip"):
            return
        from swengine.safety.actions import scale_lr

        self._tripped = True
        if decision.action == "lower_lr":
            scale_lr(self.optimizer, self.scheduler, self.breaker.rules.rollback_lr_factor)
            return
        target = None
        if decision.action == "rollback":
            from swengine.train.rollback import last_good

            target = last_good(self.out, before=decision.since, log=self.log)
        first = decision.trips[0].message.split(" -> ")[0]  # what tripped, without the action taken
        if target is None:
            why = ("no checkpoint from before it to roll back to" if decision.action == "rollback"
                   else f"safety.on_{decision.trips[0].rule}=stop")
            self._end("failed", reason="breaker")
            raise RunStopped(f"error: {first}: stopped ({why}); lower optim.lr or check the data; "
                             f"{self._last_checkpoint_words()}", FAILED)
        self._rollbacks += 1
        stream_state, phase_index = self.stream.state_dict(), self.phase_index
        self._load_checkpoint(target, rollback=True)
        if self.phase_index == phase_index:
            self.stream.load_state_dict(stream_state)
        factor = self.breaker.after_rollback(self.step, ckpt.read_state(target).get("breaker"))
        scale_lr(self.optimizer, self.scheduler, factor)
        self.log(f"breaker: rolled back to {target.name} (step {self.step}), learning rate × {factor:g}; "
                 "the data stream continues past the batches that tripped")

