"""The circuit breaker as pure logic: floats already on the host go in, :class:`Trip` s come out.
No torch, no device syncs, no I/O: the trainer reads the step's loss and gradient norm once (as it
does anyway), calls :meth:`Breaker.observe`, and carries out the most severe action.

Rules (each with its action, ``safety.on_<rule>``):

- ``nonfinite``: the loss, the gradient norm or an eval loss is NaN/inf. Fires at once.
- ``loss_spike``: robust z-score of the step's loss against the last ``loss_window`` healthy steps,
  ``z = (loss - median) / max(1.4826 · MAD, 1% of the median, 0.01 nats)``, above ``loss_spike_z``
  on two steps in a row, or above twice that on one step. Only upward; silent for the first
  ``warmup_steps`` steps. A lone moderate outlier is a hard batch, not instability: the loss is back
  on the next step and nothing needs undoing (and a rollback would replay the same batch);
  a real spike persists. The trip's ``since`` is the first step of the spike: roll back to a
  checkpoint older than that.
- ``grad_spike``: the (pre-clipping) gradient norm above ``grad_norm_spike`` × the median of the
  last ``loss_window`` healthy steps, after the warmup.
- ``eval_regression``: an eval loss more than ``eval_regression`` (0.2 = 20%) above the best so far
  (and at least 0.01 nats above it: near zero loss a tiny change is a large fraction).
- ``ppl_regression``: a context-extension phase whose perplexity at the previous length regressed
  by more than ``ppl_regression``.
- ``throughput``: tokens/s below ``throughput_drop`` × the running median for
  :data:`THROUGHPUT_PATIENCE` observations in a row, after the warmup.
- ``vram``: peak memory within ``vram_margin`` of the card.

Actions, least to most severe: ``warn`` < ``lower_lr`` (× ``rollback_lr_factor``) < ``skip`` (drop
this optimizer step: call :meth:`Breaker.observe` before ``optimizer.step()``) < ``rollback`` (to
the last good checkpoint, then on with the LR × ``rollback_lr_factor``; after ``max_rollbacks``
rollbacks a further one becomes ``stop``) < ``stop``. A warn-only per-step rule fires once per
episode (again after a step without it); throughput and VRAM fire once per episode whatever the
action. More than :data:`MAX_CONSECUTIVE_SKIPS` skipped steps in a row become ``stop``. At the end
of a context-extension phase (:meth:`Breaker.observe_phase`) the per-step baselines and the warmup
start over: longer sequences change the loss level, gradient norm and throughput by design.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, fields
from statistics import median
from typing import Literal

from swengine.errors import UserError

Action = Literal["warn", "lower_lr", "skip", "rollback", "stop"]
ACTIONS: tuple[str, ...] = ("warn", "lower_lr", "skip", "rollback", "stop")  # by severity
RULES: tuple[str, ...] = ("nonfinite", "loss_spike", "grad_spike", "eval_regression", "ppl_regression",
                          "throughput", "vram")
ACTION_KEYS = {"nonfinite": "on_nonfinite", "loss_spike": "on_loss_spike", "grad_spike": "on_grad_spike",
               "eval_regression": "on_eval_regression", "ppl_regression": "on_ppl_regression",
               "throughput": "on_throughput", "vram": "on_vram"}

MAD_TO_SIGMA = 1.4826  # MAD × this estimates σ of a normal distribution
MIN_RELATIVE_SCALE = 0.01  # the spike z-score's scale is at least 1% of the median loss
MIN_SCALE = 0.01  # and at least 0.01 nats: near zero loss, tiny absolute changes are no spike
MIN_SAMPLES = 3  # a window needs this many healthy steps before its median means anything
THROUGHPUT_PATIENCE = 3  # observations in a row below the limit before a collapse is called
MAX_CONSECUTIVE_SKIPS = 10  # skipping more steps than this in a row stops the run
LATCHED_ALWAYS = ("throughput", "vram")  # conditions that persist: one trip per episode
PER_STEP = ("loss_spike", "grad_spike", "throughput", "vram")


@dataclass
class SafetyRules:
    """The breaker's settings; mirrors ``safety.*`` of the config key for key
    (:meth:`from_config` copies every field the config has)."""

    enabled: bool = True
    loss_spike_z: float = 6.0
    loss_window: int = 50
    grad_norm_spike: float = 10.0
    eval_regression: float = 0.2
    ppl_regression: float = 0.10
    throughput_drop: float = 0.3
    vram_margin: float = 0.03
    warmup_steps: int = 20
    on_nonfinite: Action = "rollback"
    on_loss_spike: Action = "rollback"
    on_grad_spike: Action = "warn"
    on_eval_regression: Action = "warn"
    on_ppl_regression: Action = "warn"
    on_throughput: Action = "warn"
    on_vram: Action = "warn"
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5

    @classmethod
    def from_config(cls, section) -> SafetyRules:
        """From ``cfg.safety`` (any object or dict with these names); missing names keep defaults."""
        get = section.get if isinstance(section, dict) else (lambda k, d: getattr(section, k, d))
        rules = cls(**{f.name: get(f.name, f.default) for f in fields(cls)})
        rules.check()
        return rules

    def action(self, rule: str) -> str:
        return getattr(self, ACTION_KEYS[rule])

    def check(self) -> None:
        """One-line UserError naming the ``safety.*`` key of a value that makes no sense."""
        def bad(key: str, why: str):
            raise UserError(f"safety.{key}={getattr(self, key)!r}: {why}")

        for key in ACTION_KEYS.values():
            if getattr(self, key) not in ACTIONS:
                bad(key, f"not an action; use one of {', '.join(ACTIONS)}")
        if not self.loss_spike_z > 0:
            bad("loss_spike_z", "must be > 0 (robust standard deviations, e.g. 6)")
        if not (isinstance(self.loss_window, int) and self.loss_window >= MIN_SAMPLES):
            bad("loss_window", f"must be an integer >= {MIN_SAMPLES} (steps, e.g. 50)")
        if not self.grad_norm_spike > 1:
            bad("grad_norm_spike", "must be > 1 (a multiple of the median gradient norm, e.g. 10)")
        for key in ("eval_regression", "ppl_regression"):
            if not getattr(self, key) >= 0:
                bad(key, "must be >= 0 (a fraction: 0.2 = 20% worse)")
        if not 0 < self.throughput_drop < 1:
            bad("throughput_drop", "must be in (0, 1) (a fraction of the median tokens/s, e.g. 0.3)")
        if not 0 <= self.vram_margin < 1:
            bad("vram_margin", "must be in [0, 1) (a fraction of the card, e.g. 0.03)")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            bad("warmup_steps", "must be an integer >= 0")
        if not (isinstance(self.max_rollbacks, int) and self.max_rollbacks >= 0):
            bad("max_rollbacks", "must be an integer >= 0")
        if not 0 < self.rollback_lr_factor <= 1:
            bad("rollback_lr_factor", "must be in (0, 1] (the LR is multiplied by it)")


@dataclass
class Trip:
    """One rule firing. ``value`` is what was observed and ``threshold`` the level it crossed, in
    the same unit (loss, gradient norm, tokens/s, bytes, relative regression); ``message`` is one
    line ending with the action taken."""

    rule: str
    action: str
    step: int
    value: float | None
    threshold: float | None
    message: str
    since: int | None = None  # the first step of the episode (a loss spike confirmed on its second step)

    def __post_init__(self):
        if self.since is None:
            self.since = self.step

    def event(self) -> dict:
        """The fields of the telemetry ``breaker`` event (``metrics.log("breaker", **trip.event())``)."""
        return asdict(self)


def worst_action(trips: list[Trip]) -> str | None:
    """The most severe action among ``trips`` (the one the trainer carries out), or None."""
    return max((t.action for t in trips), key=ACTIONS.index, default=None)


def _replace(trips: list[Trip], old: str, new: str) -> str:
    """Turn every ``old`` action into ``new``; returns ``new``."""
    for t in trips:
        if t.action == old:
            t.action = new
    return new


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class Breaker:
    """Stateful rule evaluation for one run; :meth:`state_dict` goes into checkpoints so a resumed
    run keeps its history, rollback count and LR scale."""

    def __init__(self, rules: SafetyRules | None = None):
        self.rules = rules or SafetyRules()
        self.rules.check()
        w = self.rules.loss_window
        self.losses: deque[tuple[int, float]] = deque(maxlen=w)
        self.grad_norms: deque[tuple[int, float]] = deque(maxlen=w)
        self.throughputs: deque[tuple[int, float]] = deque(maxlen=w)
        self.seen = 0  # finite steps observed (the warmup counts these)
        self.best_eval = math.inf
        self.rollbacks = 0
        self.lr_scale = 1.0  # product of every LR cut so far (lower_lr and rollback)
        self.skips_in_row = 0
        self.slow_in_row = 0
        self.latched: set[str] = set()
        self.last_step = 0
        self.spike_pending: int | None = None  # a step whose loss was above the limit, awaiting the next

    # ------------------------------------------------------------------ observations
    def observe(self, step: int, loss: float, grad_norm: float | None = None,
                tokens_per_second: float | None = None, peak_memory_bytes: float | None = None,
                vram_total_bytes: float | None = None) -> list[Trip]:
        """Evaluate every per-step rule for optimizer step ``step``. ``None`` skips a rule (no
        gradient norm without clipping, tokens/s only on logging steps, no card on CPU)."""
        if not self.rules.enabled:
            return []
        self.last_step = step
        bad = [(what, v) for what, v in (("loss", loss), ("gradient norm", grad_norm))
               if v is not None and not math.isfinite(v)]
        if bad:
            what, v = bad[0]
            return self._settle([self._trip("nonfinite", step, v, None, f"{what} is {v} at step {step}")])
        self.seen += 1
        warm = self.seen > self.rules.warmup_steps
        found: dict[str, Trip | None] = {
            "loss_spike": self._loss_spike(step, loss) if warm else None,
            "grad_spike": self._grad_spike(step, grad_norm) if warm and grad_norm is not None else None,
            "throughput": self._throughput(step, tokens_per_second) if warm else None,
            "vram": self._vram(step, peak_memory_bytes, vram_total_bytes),
        }
        trips = [t for rule, t in found.items() if self._latch(rule, t)]
        trips = self._settle(trips)
        kept = worst_action(trips) not in ("skip", "rollback", "stop")  # the step stands
        if kept:
            self.losses.append((step, float(loss)))
            if grad_norm is not None:
                self.grad_norms.append((step, float(grad_norm)))
        if tokens_per_second is not None and found["throughput"] is None and self.slow_in_row == 0:
            self.throughputs.append((step, float(tokens_per_second)))
        return trips

    def observe_eval(self, step: int, eval_loss: float) -> list[Trip]:
        """An eval loss: non-finite, or ``eval_regression`` above the best so far."""
        if not self.rules.enabled:
            return []
        if not math.isfinite(eval_loss):
            return self._settle([self._trip("nonfinite", step, eval_loss, None,
                                            f"eval loss is {eval_loss} at step {step}")], per_step=False)
        trips = []
        limit = self.best_eval + max(self.rules.eval_regression * self.best_eval, MIN_SCALE)
        if math.isfinite(self.best_eval) and eval_loss > limit:
            trips.append(self._trip("eval_regression", step, eval_loss, limit,
                                    f"eval loss {eval_loss:.4f} at step {step} is "
                                    f"{eval_loss / self.best_eval - 1:.0%} above the best {self.best_eval:.4f} "
                                    f"(limit safety.eval_regression={self.rules.eval_regression:g})"))
        self.best_eval = min(self.best_eval, eval_loss)
        return self._settle(trips, per_step=False)

    def observe_phase(self, name: str, regression: float | None, step: int | None = None) -> list[Trip]:
        """The end of context-extension phase ``name``: its perplexity at the previous phase's
        length changed by ``regression`` (0.12 = 12% worse; None: not measured). Also restarts
        every per-step baseline and the warmup: the next phase's longer sequences change the loss
        level, the gradient norm and the throughput."""
        step = self.last_step if step is None else step
        for history in (self.losses, self.grad_norms, self.throughputs):
            history.clear()
        self.seen = self.slow_in_row = self.skips_in_row = 0
        self.spike_pending = None
        self.latched.difference_update(PER_STEP)
        if not self.rules.enabled or regression is None or not regression > self.rules.ppl_regression:
            return []
        return self._settle([self._trip("ppl_regression", step, regression, self.rules.ppl_regression,
                                        f"{name}: perplexity at the previous length regressed by {regression:.1%} "
                                        f"(limit safety.ppl_regression={self.rules.ppl_regression:g})")],
                            per_step=False)

    # ------------------------------------------------------------------ rules
    def _loss_spike(self, step: int, loss: float) -> Trip | None:
        values = [v for _, v in self.losses]
        if len(values) < MIN_SAMPLES:
            return None
        med = median(values)
        mad = median(abs(v - med) for v in values)
        scale = max(MAD_TO_SIGMA * mad, MIN_RELATIVE_SCALE * abs(med), MIN_SCALE)
        z, limit_z = (loss - med) / scale, self.rules.loss_spike_z
        pending, self.spike_pending = self.spike_pending, None
        if z <= limit_z:
            return None
        if z <= 2 * limit_z and pending is None:
            self.spike_pending = step  # one step above the limit: a spike if the next one is too
            return None
        since = step if pending is None else pending
        where = f"step {step}" if pending is None else f"steps {pending}-{step}"
        why = ("over twice the limit" if pending is None else "the second step in a row above the limit")
        trip = self._trip("loss_spike", step, loss, med + limit_z * scale,
                          f"loss spike at {where}: {_fmt(loss)} is {z:.1f} robust sigma above the median {_fmt(med)} "
                          f"of the last {len(values)} steps, {why} (safety.loss_spike_z={limit_z:g})")
        trip.since = since
        return trip

    def _grad_spike(self, step: int, norm: float) -> Trip | None:
        values = [v for _, v in self.grad_norms]
        if len(values) < MIN_SAMPLES:
            return None
        med = median(values)
        limit = self.rules.grad_norm_spike * med
        if med <= 0 or norm <= limit:
            return None
        return self._trip("grad_spike", step, norm, limit,
                          f"gradient norm {_fmt(norm)} at step {step} is {norm / med:.1f}x the median {_fmt(med)} "
                          f"of the last {len(values)} steps (limit safety.grad_norm_spike="
                          f"{self.rules.grad_norm_spike:g})")

    def _throughput(self, step: int, tps: float | None) -> Trip | None:
        values = [v for _, v in self.throughputs]
        if tps is None or len(values) < MIN_SAMPLES:
            return None
        med = median(values)
        limit = self.rules.throughput_drop * med
        if tps >= limit:
            self.slow_in_row = 0
            return None
        self.slow_in_row += 1
        if self.slow_in_row < THROUGHPUT_PATIENCE:
            return None
        return self._trip("throughput", step, tps, limit,
                          f"throughput collapsed at step {step}: {tps:,.0f} tokens/s, {tps / med:.0%} of the median "
                          f"{med:,.0f} for {self.slow_in_row} readings (limit safety.throughput_drop="
                          f"{self.rules.throughput_drop:g})")

    def _vram(self, step: int, peak: float | None, total: float | None) -> Trip | None:
        if not peak or not total:
            return None
        limit = (1 - self.rules.vram_margin) * total
        if peak <= limit:
            return None
        return self._trip("vram", step, float(peak), limit,
                          f"memory at step {step}: peak {peak / 2**30:.2f} GiB is within "
                          f"{(total - peak) / total:.1%} of the card's {total / 2**30:.2f} GiB "
                          f"(limit safety.vram_margin={self.rules.vram_margin:g})")

    # ------------------------------------------------------------------ bookkeeping
    def _trip(self, rule: str, step: int, value, threshold, text: str) -> Trip:
        return Trip(rule, self.rules.action(rule), step, value, threshold, text)

    def _latch(self, rule: str, trip: Trip | None) -> bool:
        """Whether ``trip`` fires: a persistent condition fires once until it clears."""
        if trip is None:
            if rule != "throughput" or self.slow_in_row == 0:
                self.latched.discard(rule)
            return False
        if rule in LATCHED_ALWAYS or trip.action == "warn":
            if rule in self.latched:
                return False
            self.latched.add(rule)
        return True

    def _settle(self, trips: list[Trip], per_step: bool = True) -> list[Trip]:
        """Apply the bounded retries and LR cuts once for the step's worst action, and finish each
        trip's message with the action taken."""
        if not per_step:
            _replace(trips, "skip", "warn")  # nothing to skip outside a training step
        worst = worst_action(trips)
        note = ""
        if worst == "rollback":
            if self.rollbacks >= self.rules.max_rollbacks:
                worst = _replace(trips, "rollback", "stop")
                note = f" ({self.rollbacks} rollbacks used, safety.max_rollbacks={self.rules.max_rollbacks})"
            else:
                self.rollbacks += 1
                self.lr_scale *= self.rules.rollback_lr_factor
                note = f" ({self.rollbacks} of {self.rules.max_rollbacks}; LR now x{self.lr_scale:g} of the configured)"
        elif worst == "lower_lr":
            self.lr_scale *= self.rules.rollback_lr_factor
            note = f" (LR now x{self.lr_scale:g} of the configured)"
        if per_step:
            self.skips_in_row = self.skips_in_row + 1 if worst == "skip" else 0
            if self.skips_in_row > MAX_CONSECUTIVE_SKIPS:
                worst = _replace(trips, "skip", "stop")
                note = f" ({MAX_CONSECUTIVE_SKIPS} steps skipped in a row already)"
        for t in trips:
            t.message = f"{t.message} -> {t.action}" + (note if t.action == worst else "")
        return trips

    def after_rollback(self, to_step: int, restored: dict | None = None) -> float:
        """Forget what came after ``to_step`` (the steps are redone). ``restored`` is the breaker
        state saved in the checkpoint rolled back to, if any. Returns the factor to multiply the
        restored optimizer's and scheduler's LR by (see :func:`swengine.safety.actions.scale_lr`)
        so that the LR is the configured one × :attr:`lr_scale`."""
        for history in (self.losses, self.grad_norms, self.throughputs):
            kept = [(s, v) for s, v in history if s <= to_step]
            history.clear()
            history.extend(kept)
        self.skips_in_row = self.slow_in_row = 0
        self.latched.clear()
        self.spike_pending = None
        self.last_step = to_step
        if restored and restored.get("best_eval") is not None:
            self.best_eval = float(restored["best_eval"])
        before = float((restored or {}).get("lr_scale", 1.0))
        return self.lr_scale / before

    def state_dict(self) -> dict:
        """JSON-able state (for trainer_state.json)."""
        return {"losses": [list(x) for x in self.losses], "grad_norms": [list(x) for x in self.grad_norms],
                "throughputs": [list(x) for x in self.throughputs], "seen": self.seen,
                "best_eval": None if math.isinf(self.best_eval) else self.best_eval, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale, "skips_in_row": self.skips_in_row, "slow_in_row": self.slow_in_row,
                "latched": sorted(self.latched), "last_step": self.last_step, "spike_pending": self.spike_pending}

    def load_state_dict(self, state: dict) -> None:
        for name in ("losses", "grad_norms", "throughputs"):
            history = getattr(self, name)
            history.clear()
            history.extend((int(s), float(v)) for s, v in state.get(name, []))
        self.seen = int(state.get("seen", 0))
        self.best_eval = math.inf if state.get("best_eval") is None else float(state["best_eval"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.skips_in_row = int(state.get("skips_in_row", 0))
        self.slow_in_row = int(state.get("slow_in_row", 0))
        self.latched = set(state.get("latched", []))
        self.last_step = int(state.get("last_step", 0))
        self.spike_pending = state.get("spike_pending")
