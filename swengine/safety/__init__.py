"""Safety: the circuit breaker (:mod:`.rules`), its telemetry/print/alert glue (:mod:`.monitor`),
carrying out its actions (:mod:`.actions`) and the ``--on-alert`` hook (:mod:`.alerts`). Rollback of a run directory lives in
:mod:`swengine.train.rollback`. Nothing here imports torch."""

from swengine.safety.actions import scale_lr
from swengine.safety.alerts import AlertRunner
from swengine.safety.monitor import Decision, Monitor
from swengine.safety.rules import ACTIONS, RULES, Breaker, SafetyRules, Trip, worst_action

__all__ = ["ACTIONS", "RULES", "AlertRunner", "Breaker", "Decision", "Monitor", "SafetyRules", "Trip", "scale_lr",
           "worst_action"]
