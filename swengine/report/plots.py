"""The report's plots, drawn with matplotlib (the optional ``report`` extra) on figures that need
no display and no pyplot state: loss and eval loss, learning rate, gradient norm, tokens/s,
memory, and per-phase context evaluation. Breaker events are vertical lines on every curve over
steps (coloured by action), context phases shaded bands, steps that were redone after a resume or
rollback a faded line."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from swengine.errors import UserError
from swengine.report.run import RunData

ACTION_COLOURS = {"warn": "#e69f00", "lower_lr": "#9467bd", "skip": "#8c564b", "rollback": "#d62728",
                  "stop": "#000000"}
TRAIN, EVAL, FADED = "#1f77b4", "#ff7f0e", "#b0b0b0"
WIDTH, HEIGHT, DPI = 10.0, 3.3, 110


@dataclass
class Plot:
    name: str  # file-name part: report-<name>.png
    title: str
    caption: str
    png: bytes


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise UserError("swengine report needs matplotlib, an optional extra: pip install 'swengine[report]'") from None


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _series(events: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    pairs = [(e["step"], e[key] * scale) for e in events
             if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool) and math.isfinite(e[key])]
    pairs.sort(key=lambda p: p[0])
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _maybe_log(ax, values: list[float], ratio: float = 50.0) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > ratio:
        ax.set_yscale("log")


def _phase_bands(ax, data: RunData) -> None:
    spans: list[list] = []  # [name, first step, last step]
    for e in data.current(data.train):
        name = e.get("phase")
        if name and spans and spans[-1][0] == name:
            spans[-1][2] = e["step"]
        elif name:
            spans.append([name, e["step"], e["step"]])
    for i, (name, first, last) in enumerate(spans):
        ax.axvspan(first - 0.5, last + 0.5, color="#000000", alpha=0.04 if i % 2 else 0.08, lw=0)
        ax.text((first + last) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=8, color="#555555")


CHANGES_THE_RUN = ("lower_lr", "rollback", "stop")
LOSS_RULES = ("loss_spike", "eval_regression", "nonfinite")  # shown on every curve; other trips on their own


def _breaker_lines(ax, data: RunData, rules: tuple[str, ...]) -> None:
    """Dashed lines at the steps of this curve's rules' trips and of every trip that changed the
    run (LR cut, rollback, stop), coloured by action, labelled with the rule when there are few."""
    shown = [e for e in data.breakers if e.get("rule") in rules or e.get("action") in CHANGES_THE_RUN]
    seen: set[str] = set()
    for e in shown:
        action = e.get("action", "warn")
        legend = f"breaker: {action}" if action not in seen else None
        seen.add(action)
        ax.axvline(e.get("step", 0), color=ACTION_COLOURS.get(action, "#e69f00"), lw=1.2, ls="--", alpha=0.85,
                   label=legend)
    if len(shown) <= 12:
        for e in shown:
            ax.text(e.get("step", 0), 0.97, f" {e.get('rule', '?')}", transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="left", fontsize=7,
                    color=ACTION_COLOURS.get(e.get("action"), "#e69f00"))


def _step_plot(data: RunData, key: str, ylabel: str, colour: str, rules: tuple[str, ...], scale: float = 1.0,
               log_ratio: float = 50.0):
    current = data.current(data.train)
    xs, ys = _series(current, key, scale)
    if not xs:
        return None
    fig, ax = _figure()
    _phase_bands(ax, data)
    fx, fy = _series([e for e in data.train if e.get("superseded")], key, scale)
    if fx:
        ax.plot(fx, fy, ".", color=FADED, ms=3, label="redone after a resume or rollback")
    ax.plot(xs, ys, "-", color=colour, lw=1.3, marker="." if len(xs) < 60 else None, label=ylabel)
    _maybe_log(ax, ys + fy, log_ratio)
    _breaker_lines(ax, data, rules)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    return fig


def loss_plot(data: RunData):
    current = data.current(data.train)
    xs, ys = _series(current, "loss")
    ex, ey = _series(data.current(data.evals), "eval_loss")
    if not xs and not ex:
        return None
    fig, ax = _figure()
    _phase_bands(ax, data)
    fx, fy = _series([e for e in data.train if e.get("superseded")], "loss")
    if fx:
        ax.plot(fx, fy, ".", color=FADED, ms=3, label="redone after a resume or rollback")
    if xs:
        ax.plot(xs, ys, "-", color=TRAIN, lw=1.2, label="train loss")
    if ex:
        ax.plot(ex, ey, "o-", color=EVAL, lw=1.5, ms=4, label="eval loss")
    _maybe_log(ax, ys + ey + fy)
    _breaker_lines(ax, data, LOSS_RULES)
    for e in data.breakers:  # the value that tripped, where it is a loss
        if e.get("rule") in LOSS_RULES and isinstance(e.get("value"), (int, float)):
            ax.plot([e["step"]], [e["value"]], "X", color=ACTION_COLOURS.get(e.get("action"), "red"), ms=8,
                    mec="black", mew=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    return fig


def context_plot(data: RunData):
    if not data.phase_ends:
        return None
    fig, ax = _figure()
    for e in data.phase_ends:
        pairs = sorted((int(k), v) for k, v in (e.get("ppl") or {}).items() if isinstance(v, (int, float)))
        if not pairs:
            continue
        label = f"after {e.get('phase')} ({e.get('seq_len')} tokens)"
        if isinstance(e.get("regression"), (int, float)):
            label += f", {e['regression']:+.1%} at the previous length"
        line, = ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "o-", lw=1.5, ms=5, label=label)
        if e.get("flagged"):
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "x", color=ACTION_COLOURS["rollback"], ms=9, mew=2)
            line.set_label(label + " (flagged)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    return fig


def make_plots(data: RunData) -> list[Plot]:
    """Every plot there is data for, as PNG bytes."""
    require_matplotlib()
    memory_kind = next((e.get("memory_kind") for e in reversed(data.train) if e.get("memory_kind")), None)
    memory = "GPU memory allocated, peak (GiB)" if memory_kind == "cuda_allocated" else "process memory, peak RSS (GiB)"
    specs = [
        ("loss", "Loss", "Train loss per logged step and eval loss; dashed lines: loss trips (X: the value that "
         "tripped) and every trip that cut the LR, rolled back or stopped (on all curves).", loss_plot(data)),
        ("lr", "Learning rate", "After warmup and schedule, and any LR cut by the breaker.",
         _step_plot(data, "lr", "learning rate", "#2ca02c", (), log_ratio=1e9)),
        ("grad_norm", "Gradient norm", "Before clipping; dashed lines: gradient-norm trips.",
         _step_plot(data, "grad_norm", "gradient norm", "#9467bd", ("grad_spike", "nonfinite"))),
        ("throughput", "Throughput", "Tokens per second over each logging window; dashed lines: throughput trips.",
         _step_plot(data, "tokens_per_second", "tokens/s", "#17becf", ("throughput",), log_ratio=1e9)),
        ("memory", "Memory", memory + "; dashed lines: VRAM-margin trips.",
         _step_plot(data, "peak_memory_bytes", memory.split(",")[0] + " (GiB)", "#8c564b", ("vram",),
                    scale=1 / 2**30, log_ratio=1e9)),
        ("context", "Context evaluation per phase", "Perplexity at each evaluated length after each "
         "context-extension phase (x: flagged by the perplexity-regression rule).", context_plot(data)),
    ]
    return [Plot(name, title, caption, _png(fig)) for name, title, caption, fig in specs if fig is not None]
