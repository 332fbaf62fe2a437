"""`swengine report`: one self-contained HTML file per run (plots embedded as PNG, no network
needed to view it), optionally the plots as PNG files too, and ``--watch`` to re-render while the
run goes on (the cockpit: the page reloads itself). matplotlib is an optional extra:
``pip install 'swengine[report]'``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swengine.errors import UserError


@dataclass
class Written:
    html: Path
    pngs: list[Path]
    finished: bool  # the run had ended when this was rendered
    running: bool  # a live run still holds the directory


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_out(run_dir: str | Path) -> Path:
    return Path(run_dir) / "report.html"


def render(run_dir: str | Path, out: str | Path | None = None, png: bool = False,
           refresh: float | None = None) -> Written:
    """Write the report (and with ``png`` the plots as ``<out stem>-<plot>.png`` next to it)."""
    from swengine.report.page import render_html
    from swengine.report.plots import make_plots, require_matplotlib
    from swengine.report.run import live_pid, load

    require_matplotlib()
    data = load(run_dir)
    out = Path(out) if out else default_out(run_dir)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist")
    plots = make_plots(data)
    finished = data.finished
    _atomic_write(out, render_html(data, plots, None if finished else refresh).encode())
    pngs = []
    if png:
        for p in plots:
            path = out.with_name(f"{out.stem}-{p.name}.png")
            _atomic_write(path, p.png)
            pngs.append(path)
    return Written(out, pngs, finished, live_pid(data.run_dir) is not None)


def watch(run_dir: str | Path, out: str | Path | None = None, png: bool = False, interval: float = 10.0,
          log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep) -> Written:
    """Re-render every ``interval`` seconds until the run writes its run_end (or no live run holds
    the directory any more), then once more; Ctrl-C stops watching after the last render."""
    if not interval > 0:
        raise UserError(f"--interval {interval}: must be > 0 seconds")
    written = render(run_dir, out, png, refresh=interval)
    log(f"watching {run_dir}: {written.html} is re-rendered every {interval:g} s (it reloads itself in a browser); "
        "Ctrl-C stops")
    try:
        while not written.finished and written.running:
            sleep(interval)
            written = render(run_dir, out, png, refresh=interval)
    except KeyboardInterrupt:
        log("stopped watching")
        return written
    if written.finished:
        log("the run has ended; the report is final")
    else:
        log("no live run holds the directory and its last invocation wrote no run_end (killed?); stopped watching")
        written = render(run_dir, out, png)
    return written
