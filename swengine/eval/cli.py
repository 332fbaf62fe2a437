"""`swengine eval`: the Typer command. Only typer and the standard library are imported here;
torch, transformers and the evaluation modules load when the command runs. Bad input raises
:class:`swengine.errors.UserError`, which the entry point (``swengine.cli.main``) turns into one
line (or JSON with --json) and exit code 2."""

from __future__ import annotations

import json
import math
from typing import Literal

import typer

from swengine.errors import UserError


def parse_lengths(text: str) -> list[int]:
    """'2048,4096,8k' → [2048, 4096, 8192]: positive integers, a k/K suffix meaning ×1024."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        scale = 1024 if part[-1:] in ("k", "K") else 1
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) == 0:
            raise UserError(f"--lengths: {part!r} is not a positive integer; pass e.g. --lengths 2048,4096,8192")
        out.append(int(digits) * scale)
    return out


def parse_depths(text: str) -> list[float]:
    """'0,0.25,0.5' → [0.0, 0.25, 0.5]: fractions of the filler ahead of the pass key, in [0, 1]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--passkey-depths: {part!r} is not a number in [0, 1]; pass e.g. 0,0.25,0.5,0.75,1")
        out.append(value)
    return out


def eval_command(
    target: str = typer.Argument(..., metavar="RUN_DIR|MODEL", help="A `swengine train` output directory (its adapter/, loaded on the base "
                                 "model with the run's RoPE scaling), a checkpoint or adapter directory, or a Hugging "
                                 "Face model directory (e.g. a merged model)."),
    lengths: str = typer.Option(..., "--lengths", metavar="L1,L2,...", help="Context lengths in tokens, comma-separated, e.g. "
                                "2048,4096,8192 (8k = 8192)."),
    adapter: str = typer.Option(None, "--adapter", help="With a MODEL directory: a LoRA adapter (or run) directory "
                                "to load onto it."),
    data: str = typer.Option(None, "--data", help="Text to measure perplexity on (.jsonl/.json/.parquet/.txt; "
                             "records are tokenized as in training and concatenated). Default: the run's data.eval, "
                             "else the demo's eval data."),
    window: int = typer.Option(None, "--window", help="Perplexity window in tokens (default: the length; at most "
                               "the length)."),
    stride: int = typer.Option(None, "--stride", help="Tokens between window starts (default: half the window); "
                               "each token is scored once."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Use at most this many tokens of the data."),
    all_tokens: bool = typer.Option(False, "--all-tokens", help="Score every token of instruction data, prompts "
                                    "included (default: as the run trained: completions / assistant turns only, "
                                    "unless data.train_on_prompt; text data is always scored whole)."),
    passkey_depths: str = typer.Option("0,0.25,0.5,0.75,1", "--passkey-depths", metavar="D1,D2,...", help="Where the pass key sits, as "
                                       "fractions of the filler text ahead of it (0 = start, 1 = end)."),
    passkey_trials: int = typer.Option(5, "--passkey-trials", help="Pass keys per (length, depth); 0 skips the "
                                       "passkey test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pass keys."),
    out: str = typer.Option(None, "--out", help="Also write the JSON report to this file (atomically)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report (specs/eval.schema.json) instead of "
                                 "the table."),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", "--device", help="Where to run (auto: the GPU "
                                                          "when there is one)."),
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = typer.Option("auto", "--dtype", help="Weights and compute dtype "
                                                                  "(auto: bf16, or fp16 without bf16, on a GPU; "
                                                                  "fp32 on CPU)."),
    rope_scaling: str = typer.Option(None, "--rope-scaling", metavar="JSON", help="RoPE scaling to apply, as JSON, e.g. "
                                     "'{\"rope_type\": \"yarn\", \"factor\": 4}' (default: the run's, else the "
                                     "model's own)."),
) -> None:
    """Long-context evaluation: sliding-window perplexity and passkey retrieval at each length.

    Prints a table (length × perplexity and passkey accuracy by depth), or with --json the report
    (specs/eval.schema.json); progress and notices go to stderr. Exit 2: bad input (a UserError,
    one line, as every command reports it)."""
    parsed_lengths = parse_lengths(lengths)
    depths = parse_depths(passkey_depths)
    from swengine.eval.loading import parse_rope_scaling
    from swengine.eval.report import check_out, render, write_json

    if out:
        check_out(out)  # before minutes of evaluation, not after
    from swengine.eval.runner import run_eval

    report = run_eval(target, parsed_lengths, adapter=adapter, data=data, window=window, stride=stride,
                      max_tokens=max_tokens, depths=depths, trials=passkey_trials, seed=seed, device=device,
                      dtype=dtype, rope_scaling=parse_rope_scaling(rope_scaling), all_tokens=True if all_tokens else None,
                      log=lambda m: typer.echo(m, err=True))
    if out:
        typer.echo(f"wrote {write_json(report, out)}", err=True)
    typer.echo(json.dumps(report, indent=2, allow_nan=False) if as_json else render(report))
