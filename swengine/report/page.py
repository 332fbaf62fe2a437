"""The report as one self-contained HTML file: inline CSS, plots as base64 PNG, no scripts and no
network references, so it opens anywhere (and can be mailed or archived as it is)."""

from __future__ import annotations

import base64
import json
import math
import statistics
import time
from html import escape

from swengine.report.plots import ACTION_COLOURS, Plot
from swengine.report.run import RunData

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1150px;
padding:18px 24px;color:#222;background:#fff}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:2px 24px}
.kv{display:flex;justify-content:space-between;gap:12px;border-bottom:1px dotted #ddd;padding:2px 0}
.kv span{white-space:nowrap}.kv b{font-weight:600;text-align:right;overflow-wrap:break-word;min-width:0}
details summary{cursor:pointer;color:#444;margin:4px 0}
figure{margin:10px 0 18px}figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px;border:1px solid #eee}
.pill{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px}
.status-completed{color:#2a7d2a}.status-failed{color:#c62828}.status-running{color:#1565c0}
"""


def _num(value, fmt: str = "{:.4f}") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return fmt.format(value)


def _summary(data: RunData) -> list[tuple[str, str]]:
    start, cur = data.start, data.current(data.train)
    last = cur[-1] if cur else {}
    evals = [e["eval_loss"] for e in data.current(data.evals) if isinstance(e.get("eval_loss"), (int, float))]
    tps = [e["tokens_per_second"] for e in cur if isinstance(e.get("tokens_per_second"), (int, float))]
    peak = max((e.get("peak_memory_bytes") or 0 for e in data.train), default=0)
    end = data.ends[-1] if data.finished and data.ends else {}
    rows = [
        ("status", data.status + (f" ({end['reason']})" if end.get("reason") else "")),
        ("model", str(start.get("model", "-"))),
        ("device / dtype", f"{start.get('device', '-')} / {start.get('dtype', '-')}"),
        ("steps", f"{last.get('step', start.get('step', 0))} of {start.get('total_steps', '?')}"),
        ("trainable parameters", f"{start['trainable_params']:,}" if isinstance(start.get("trainable_params"), int)
         else "-"),
        ("train loss (last logged)", _num(last.get("loss"))),
        ("eval loss first / best / last", " / ".join(_num(v) for v in (evals[0], min(evals), evals[-1]))
         if evals else "-"),
        ("tokens/s (median)", _num(statistics.median(tps), "{:,.0f}") if tps else "-"),
        ("peak memory", f"{peak / 2**30:.2f} GiB" if peak else "-"),
        ("invocations (resumes)", f"{len(data.starts)} ({max(len(data.starts) - 1, 0)})"),
        ("breaker trips", str(len(data.breakers))),
        ("lineage", str(start.get("lineage", "-"))),
    ]
    if "skill_before" in end and end.get("skill_before") is not None:
        rows.append(("demo skill before / after", f"{_num(end['skill_before'], '{:.0%}')} / "
                                                  f"{_num(end.get('skill_after'), '{:.0%}')}"))
    return rows


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _breakers(data: RunData) -> str:
    if not data.breakers:
        return "<p>No circuit-breaker trips.</p>"
    rows = []
    for e in data.breakers:
        action = str(e.get("action", "?"))
        pill = f"<span class='pill' style='background:{ACTION_COLOURS.get(action, '#e69f00')}'>{escape(action)}</span>"
        rows.append([str(e.get("step", "")), escape(str(e.get("rule", "?"))), pill,
                     escape(str(e.get("message", "")))])
    counts: dict[str, int] = {}
    for e in data.breakers:
        counts[str(e.get("rule"))] = counts.get(str(e.get("rule")), 0) + 1
    what = ", ".join(f"{n} {rule}" for rule, n in counts.items())
    return (f"<details{' open' if len(rows) <= 10 else ''}><summary>{len(rows)} trip{'s' if len(rows) != 1 else ''}: "
            f"{escape(what)}</summary>" + _table(["step", "rule", "action", "message"], rows, {0}) + "</details>")


def _phases(data: RunData) -> str:
    if not data.phase_ends:
        return ""
    lengths = sorted({int(k) for e in data.phase_ends for k in (e.get("ppl") or {})})
    rows = []
    for e in data.phase_ends:
        ppl = {int(k): v for k, v in (e.get("ppl") or {}).items()}
        rows.append([escape(str(e.get("phase", "?"))), str(e.get("seq_len", "-"))]
                    + [_num(ppl.get(n), "{:.3f}") for n in lengths]
                    + [_num(e.get("regression"), "{:+.1%}"), "yes" if e.get("flagged") else "no"])
    headers = ["phase", "trained at"] + [f"ppl @ {n}" for n in lengths] + ["regression", "flagged"]
    return "<h2>Context phases</h2>" + _table(headers, rows, set(range(1, len(headers) - 1)))


def _checkpoints(data: RunData) -> str:
    if not data.checkpoints:
        return ""
    rows = []
    for e in data.checkpoints:
        path = str(e.get("path", ""))
        name = path.rstrip("/").rsplit("/", 1)[-1]
        here = (data.run_dir / "checkpoints" / name).is_dir()
        where = ("no: the step was redone after a resume or rollback" + (" (this name holds the new one)" if here
                                                                          else "") if e.get("superseded")
                 else "yes" if here else "no (pruned, archived or rolled back)")
        rows.append([str(e.get("step", "")), escape(str(e.get("kind", ""))), escape(name), escape(where)])
    return "<h2>Checkpoints written</h2>" + _table(["step", "kind", "name", "still in checkpoints/"], rows, {0})


def _yaml(value) -> str:
    try:
        import yaml

        return yaml.safe_dump(value, sort_keys=False, default_flow_style=False)
    except ImportError:  # pragma: no cover - yaml is a dependency
        return json.dumps(value, indent=2)


def render_html(data: RunData, plots: list[Plot], refresh: float | None = None) -> str:
    from swengine import __version__

    title = f"swengine run report: {data.run_dir.name}"
    meta = f"<meta http-equiv='refresh' content='{max(1, round(refresh))}'>" if refresh else ""
    status = data.status.split(" ")[0]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta name='viewport' content='width=device-width,initial-scale=1'>{meta}<title>{escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p class='sub'>{escape(str(data.run_dir.resolve()))} &middot; <span class='status-{escape(status)}'>"
        f"{escape(data.status)}</span> &middot; generated {escape(time.strftime('%Y-%m-%d %H:%M:%S'))} by swengine "
        f"{escape(__version__)}" + (f" &middot; refreshed every {refresh:g} s while the run goes on" if refresh else "")
        + "</p>",
        "<div class='grid'>" + "".join(f"<div class='kv'><span>{escape(k)}</span><b>"
                                       f"{escape(v).replace('/', '/<wbr>')}</b></div>"
                                       for k, v in _summary(data)) + "</div>",
        "<h2>Curves</h2>",
    ]
    for p in plots:
        data_uri = "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")
        parts.append(f"<figure id='plot-{p.name}'><img src='{data_uri}' alt='{escape(p.title)}'>"
                     f"<figcaption><b>{escape(p.title)}.</b> {escape(p.caption)}</figcaption></figure>")
    parts += ["<h2>Circuit breaker</h2>", _breakers(data)]
    parts.append(_phases(data))
    parts.append(_checkpoints(data))
    config = data.config
    parts.append("<h2>Resolved config</h2>" + (f"<pre>{escape(_yaml(config))}</pre>" if config else
                                              "<p>No run_start event with a config.</p>"))
    if data.plan:
        parts.append(f"<h2>Plan</h2><pre>{escape(json.dumps(data.plan, indent=2))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)
