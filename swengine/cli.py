"""The `swengine` command line. One small function per command; the work lives in the modules."""

from __future__ import annotations

import json
import sys

import typer

from swengine.errors import UserError

PLANNED = "eval, rollback, report"

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


@app.command()
def plan(
    model: str = typer.Option(..., "--model", "-m", help="Preset (e.g. llama-3.1-8b), HF model directory, or config.json."),
    gpu: str = typer.Option(None, "--gpu", help="GPU to plan for, e.g. rtx-4090 (default: the detected GPU)."),
    vram: float = typer.Option(None, "--vram", help="VRAM in GiB, > 0 (overrides the GPU's, or plans for a bare "
                               "size)."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Training sequence length in tokens. Beyond the model's "
                                "max_position_embeddings the memory is still planned (for context extension) but "
                                "a warning line names the context.rope_scaling it needs (JSON: \"warnings\")."),
    batch: int = typer.Option(16, "--batch", help="Effective batch in sequences (micro-batch × accumulation)."),
    rank: int = typer.Option(None, "--rank", help="LoRA rank (default: the planner chooses)."),
    qlora: bool = typer.Option(None, "--qlora/--no-qlora", help="Force / forbid NF4 base weights (default: decide)."),
    teacher: str = typer.Option(None, "--teacher", help="Distillation teacher model (preset/dir/config.json)."),
    teacher_quant: str = typer.Option("none", "--teacher-quant", help="Teacher weights: none (bf16) or nf4-dq."),
    lora_impl: str = typer.Option("swkernels", "--lora-impl", help="LoRA layers: swkernels (fused kernels) or peft."),
    loss: str = typer.Option("fused", "--loss", help="fused (chunked linear+CE, no full logits) or unfused "
                             "(transformers' fp32 logits)."),
    max_ctx: bool = typer.Option(False, "--max-context", help="Also report the longest sequence that fits."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (specs/plan.schema.json)."),
) -> None:
    """Plan VRAM: memory breakdown, the fastest setup that fits, and a fits / does-not-fit verdict.

    Exit 0: fits; 1: does not fit; 2: bad input (one line). A --seq-len beyond the model's
    max_position_embeddings is planned but warned about: training at that length needs
    context.rope_scaling."""
    from swengine.planner.cli import make_plan
    from swengine.planner.report import render, to_dict

    result = make_plan(model, gpu=gpu, vram_gib=vram, seq_len=seq_len, batch=batch, rank=rank, qlora=qlora,
                       teacher=teacher, teacher_quant=teacher_quant, lora_impl=lora_impl, loss=loss,
                       want_max_context=max_ctx)
    typer.echo(json.dumps(to_dict(result), indent=2) if as_json else render(result))
    if not result.fits:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    args: list[str] = typer.Argument(None, help="An optional YAML config, then key=value overrides "
                                     "(e.g. lora.rank=32 data.train=data.jsonl)."),
    resume: str = typer.Option(None, "--resume", help="auto (latest checkpoint of output_dir) or a checkpoint path."),
    auto: bool = typer.Option(False, "--auto", help="Let the VRAM planner pick rank, micro-batch, accumulation "
                              "and checkpointing for the GPU."),
    gpu: str = typer.Option(None, "--gpu", help="With --auto: plan for this GPU instead of the detected one."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config (and plan) and stop."),
    strict_kernels: bool = typer.Option(False, "--strict-kernels", help="Fail instead of warning when a layer "
                                        "cannot run on swkernels (same as model.strict_kernels=true)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start a new run in a used output_dir; the old run "
                                   "is moved to output_dir/archive/<time>/, never deleted."),
) -> None:
    """Fine-tune with LoRA/QLoRA. With no arguments: the embedded offline demo (tiny model, CPU-friendly).
    Exit codes: 2 bad input, 3 stopped by a failure (e.g. disk full), 130/143 stopped by SIGINT/SIGTERM
    (a checkpoint was saved; continue with --resume auto)."""
    from swengine.train.cli import run_train
    from swengine.train.stops import RunStopped

    try:
        run_train(args or [], resume=resume, auto=auto or None, gpu=gpu, dry_run=dry_run,
                  strict_kernels=strict_kernels, overwrite=overwrite)
    except RunStopped as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(exc.code) from None


@app.command()
def merge(
    run_or_adapter: str = typer.Argument(..., help="A run directory (its adapter/) or an adapter directory."),
    out: str = typer.Option(..., "--out", help="Where to write the merged model."),
    base: str = typer.Option(None, "--base", help="Base model path (default: the adapter's base_model_name_or_path)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights dtype of the merged model: fp32, bf16 or fp16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out (never the base model's "
                                   "directory)."),
) -> None:
    """Merge a LoRA adapter into its base model and save a model transformers loads directly.

    The model is written to a temporary sibling of --out and renamed into place, so a failed merge
    leaves no partial model and an existing --out intact."""
    from swengine.train.merge import merge as do_merge

    path = do_merge(run_or_adapter, out, base, dtype, overwrite=overwrite)
    typer.echo(f"merged model written to {path}  (AutoModelForCausalLM.from_pretrained({str(path)!r}))")


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
