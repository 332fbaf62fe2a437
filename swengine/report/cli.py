"""`swengine report`: the Typer command. Only typer and the standard library are imported here;
matplotlib and the report modules load when the command runs. Bad input raises
:class:`swengine.errors.UserError` (one line, exit 2)."""

from __future__ import annotations

import typer

from swengine.errors import UserError


def report_command(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="The output_dir of a `swengine train` run."),
    out: str = typer.Option(None, "--out", help="The HTML file to write (default: RUN_DIR/report.html)."),
    png: bool = typer.Option(False, "--png", help="Also write each plot as a PNG next to it "
                             "(<name>-loss.png, <name>-lr.png, ...)."),
    watch: bool = typer.Option(False, "--watch", help="Re-render every --interval seconds while the run goes on "
                               "(the page reloads itself in a browser), until its run_end or Ctrl-C."),
    interval: float = typer.Option(10.0, "--interval", help="Seconds between renders with --watch."),
) -> None:
    """Write one self-contained HTML report of a run: loss and eval loss, LR, gradient norm,
    tokens/s, memory, per-phase context evaluation, circuit-breaker events marked on the curves,
    the resolved config and the plan. No network is needed to view it.

    Needs matplotlib: pip install 'swengine[report]'. Exit 2: not a run directory, bad option."""
    from swengine import report

    def notice(message: str) -> None:
        typer.echo(message, err=True)

    if watch:
        written = report.watch(run_dir, out, png, interval, log=notice)
    else:
        if not interval > 0:
            raise UserError(f"--interval {interval}: must be > 0 seconds")
        written = report.render(run_dir, out, png)
    typer.echo(f"report: {written.html}")
    for path in written.pngs:
        typer.echo(f"plot: {path}")
