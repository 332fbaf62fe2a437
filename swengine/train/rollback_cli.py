"""`swengine rollback`: the Typer command. Only typer and the standard library are imported here;
the checkpoint code (and torch) loads when the command runs. Bad input raises
:class:`swengine.errors.UserError` (one line, exit 2, JSON with --json)."""

from __future__ import annotations

import json

import typer

from swengine.errors import UserError


def rollback_command(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="The output_dir of a `swengine train` run."),
    to: str = typer.Option(None, "--to", metavar="TARGET", help="phase-N (the checkpoint that completed "
                           "context phase N), step-N, best (lowest eval loss) or last-good (the newest checkpoint "
                           "that verifies and was not written after a breaker trip)."),
    list_: bool = typer.Option(False, "--list", help="List the checkpoints, whether each verifies, and the "
                               "targets; change nothing (the default without --to)."),
    as_json: bool = typer.Option(False, "--json", help="Print the listing or the result as JSON."),
) -> None:
    """Roll a run back to an earlier checkpoint, archiving (never deleting) what came after.

    The target becomes the run's newest checkpoint and adapter/ a byte-for-byte copy of its
    adapter; later checkpoints and a different adapter/ move to RUN_DIR/archive/rollback-<time>/.
    Continue with `swengine train <config> --resume auto`. Refused while a live run holds the
    directory. Exit 2: bad input (one line; a missing phase lists the valid ones)."""
    from swengine import SCHEMA_VERSION
    from swengine.train import rollback as rb

    def emit(data: dict) -> None:
        typer.echo(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2))

    if list_ and to:
        raise UserError("--list only shows the checkpoints; drop it to roll back with --to")
    if not to:
        run, entries = rb.listing(run_dir)
        if as_json:
            emit({"run_dir": str(run), "checkpoints": [e.to_dict() for e in entries],
                  "targets": {k: e.name for k, e in rb.targets(entries).items()}})
        else:
            typer.echo(rb.describe(run, entries))
        return
    result = rb.rollback(run_dir, to, log=lambda m: typer.echo(m, err=True))
    run = result.adapter.parent
    if as_json:
        emit({"run_dir": str(run), "target": result.target.to_dict(),
              "archive": str(result.archive) if result.archive else None, "moved": result.moved,
              "adapter": str(result.adapter)})
    else:
        typer.echo(rb.done_words(run, result))
