"""`swengine distill-cache`: the Typer command. Only typer and the standard library are imported
here; torch, transformers and :mod:`swengine.distill.cache` load when the command runs. Bad
input raises :class:`swengine.errors.UserError` (one line, exit 2 through ``swengine.cli.main``)."""

from __future__ import annotations

from typing import Literal

import typer

from swengine.errors import UserError


def _config(args: list[str]):
    """The training config the cache must match: an optional YAML file, then key=value overrides."""
    from swengine.config import load_config

    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else None
    bad = [a for a in args if "=" not in a]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: give an optional YAML config first, then key=value "
                        "overrides (e.g. data.packing=false seed=1)")
    return load_config(path, args)


def distill_cache_command(
    args: list[str] = typer.Argument(None, metavar="CONFIG KEY=VALUE",
                                     help="The training config the cache is for (YAML), then key=value overrides: "
                                     "its data.* settings and seed decide the cached rows, exactly as `swengine "
                                     "train` prepares them."),
    teacher: str = typer.Option(None, "--teacher", help="Teacher model: a directory or hub id (default: the "
                                "config's distill.teacher)."),
    out: str = typer.Option(..., "--out", help="Cache directory to write (train with distill.cache=DIR). A rerun "
                            "of the same command finishes an interrupted cache."),
    data: str = typer.Option(None, "--data", help="Training data file (default: the config's data.train; the "
                             "demo data when neither is given)."),
    top_k: int = typer.Option(64, "--top-k", help="Teacher log-probs kept per token (the vocabulary size keeps them "
                              "all: the offline loss then equals the online one)."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Overrides data.max_seq_len (must equal "
                                    "training's)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per teacher forward pass."),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", "--device", help="Where the teacher runs."),
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = typer.Option("auto", "--dtype", help="Teacher weights and "
                                                                  "compute dtype (auto: bf16/fp16 on a GPU, fp32 "
                                                                  "on CPU)."),
    teacher_4bit: bool = typer.Option(None, "--teacher-4bit/--no-teacher-4bit", help="Load the teacher in NF4 "
                                      "with double quantisation (default: the config's distill.teacher_4bit)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="The student model (directory or hub id) whose "
                                  "tokenizer training uses (default: the teacher's; the vocabularies must match)."),
    logprobs_dtype: Literal["fp16", "fp32"] = typer.Option("fp16", "--logprobs-dtype", help="Stored log-prob "
                                                           "precision."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache built with other settings in --out."),
) -> None:
    """Precompute the teacher's top-k log-probs of every training token (offline distillation).

    Writes safetensors shards and a manifest.json (specs/distill_cache.schema.json) to --out;
    shards are written atomically, so after a kill the same command resumes where it stopped.
    Progress on stderr, a summary on stdout. Exit 2: bad input (one line)."""
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {top_k})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    if max_seq_len is not None and max_seq_len < 1:
        raise UserError(f"--max-seq-len must be >= 1 (got {max_seq_len})")
    cfg = _config(args)
    if data is not None:
        cfg.data.train = data
    if max_seq_len is not None:
        cfg.data.max_seq_len = max_seq_len
    distill = getattr(cfg, "distill", None)  # the config's distill section, once the schema has one
    teacher = teacher or getattr(distill, "teacher", None)
    if not teacher:
        raise UserError("--teacher is required (a model directory or hub id), or distill.teacher in the config")
    if teacher_4bit is None:
        teacher_4bit = bool(getattr(distill, "teacher_4bit", False))
    from swengine.distill.cache import distill_cache

    result = distill_cache(out, teacher=teacher, data_cfg=cfg.data, seed=cfg.seed, top_k=top_k,
                           batch_size=batch_size, device=device, dtype=dtype,
                           quant="nf4-dq" if teacher_4bit else "none", tokenizer=tokenizer,
                           logprobs_dtype=logprobs_dtype, overwrite=overwrite, attention=cfg.model.attention,
                           log=lambda m: typer.echo(m, err=True))
    m = result.manifest
    typer.echo(f"distill cache {out}: {m['rows']} rows, {m['cached_tokens']} tokens, top-{m['top_k']} in "
               f"{m['shards_total']} shards ({result.computed} computed, {result.kept} kept); train with "
               f"distill.cache={out}")
