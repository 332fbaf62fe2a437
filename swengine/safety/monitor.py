"""Glue between the :class:`~swengine.safety.rules.Breaker` and a run: every trip becomes a
telemetry ``breaker`` event, one printed line and (with ``--on-alert``) an alert; the caller gets
the action to carry out. No torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from swengine.safety.alerts import AlertRunner
from swengine.safety.rules import Breaker, Trip, worst_action


@dataclass
class Decision:
    action: str | None  # the most severe action (None: nothing tripped)
    trips: list[Trip] = field(default_factory=list)

    @property
    def since(self) -> int | None:
        """The earliest step the trips date from: roll back to a checkpoint older than this."""
        return min((t.since for t in self.trips), default=None)


class Monitor:
    def __init__(self, breaker: Breaker, metrics=None, log: Callable[[str], None] = print,
                 alerts: AlertRunner | None = None):
        self.breaker, self.metrics, self.log, self.alerts = breaker, metrics, log, alerts

    def step(self, step: int, loss: float, grad_norm: float | None = None, tokens_per_second: float | None = None,
             peak_memory_bytes: float | None = None, vram_total_bytes: float | None = None,
             phase: str | None = None) -> Decision:
        return self._emit(self.breaker.observe(step, loss, grad_norm, tokens_per_second, peak_memory_bytes,
                                               vram_total_bytes), phase)

    def eval(self, step: int, eval_loss: float, phase: str | None = None) -> Decision:
        return self._emit(self.breaker.observe_eval(step, eval_loss), phase)

    def phase_end(self, name: str, regression: float | None, step: int | None = None) -> Decision:
        return self._emit(self.breaker.observe_phase(name, regression, step), name)

    def _emit(self, trips: list[Trip], phase: str | None) -> Decision:
        for t in trips:
            record = t.event()
            if self.metrics is not None:
                record = self.metrics.log("breaker", phase=phase, **record)
            self.log(f"breaker: {t.message}")
            if self.alerts is not None:
                self.alerts.send({"event": "breaker", "phase": phase, **record})
        return Decision(worst_action(trips), trips)
