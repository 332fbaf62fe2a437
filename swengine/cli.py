"""The `swengine` command line. One small function per command; the work lives in the modules."""

from __future__ import annotations

import json
import sys

import typer

from swengine.errors import UserError

PLANNED = "train, plan, eval, merge, rollback, report"

app = typer.Typer(
    name="swengine",
    help="Fine-tune open LLMs fast on one consumer GPU (LoRA/QLoRA, context extension, distillation).",
    epilog=f"Planned, not yet available: {PLANNED}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Fine-tune open LLMs fast on one consumer GPU (LoRA/QLoRA, context extension, distillation)."""


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (specs/doctor.schema.json)."),
    kernels: bool = typer.Option(False, "--kernels", help="Also AOT-compile every Triton kernel for sm_75..sm_90 "
                                 "and fail on register spills or shared-memory overflow."),
    arch: list[int] = typer.Option(None, "--arch", help="With --kernels: only this compute capability, e.g. 86."),
) -> None:
    """Show versions, CUDA and GPUs (via NVML), the kernel backend, and optionally kernel health."""
    from swengine.doctor import collect, render

    report = collect(kernels=kernels, archs=arch or None)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))
    if report["kernel_health"] is not None and not report["kernel_health"]["ok"]:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from swkernels._backend import BackendError

    try:
        app()
    except (UserError, BackendError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
