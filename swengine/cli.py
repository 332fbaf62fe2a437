"""The `swengine` command line. One small function per command; the work lives in the modules.

Streams: stdout carries the command's result (the plan table, YAML, JSON, a summary); progress
and notices go to stderr. Exit codes are :data:`EXIT_CODES` (also in ``swengine --help``).
"""

from __future__ import annotations

import json
import sys
from typing import Literal

import typer

from swengine import SCHEMA_VERSION
from swengine.errors import UserError

ARGV: list[str] = []  # this invocation's arguments (``--nproc`` passes them on to torchrun)

EXIT_CODES = {
    0: "ok",
    1: "the answer is no (the plan does not fit, kernels unhealthy)",
    2: "usage error or bad input (one line saying how to fix it)",
    3: "training stopped by a failure (non-finite loss, out of memory, disk full)",
    130: "interrupted by Ctrl-C (143: SIGTERM); a checkpoint was saved: --resume auto",
}

app = typer.Typer(
    name="swengine",
    help="Fine-tune open LLMs fast on one consumer GPU (LoRA/QLoRA, context extension, distillation).",
    # "\b" keeps click from re-wrapping the table
    epilog="\b\nExit codes:\n" + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items()),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # plain click help: switches shown as switches, no box drawing
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from swengine import __version__

        typer.echo(f"swengine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Fine-tune open LLMs fast on one consumer GPU (LoRA/QLoRA, context extension, distillation)."""


def print_json(data: dict) -> None:
    typer.echo(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2))


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (specs/doctor.schema.json)."),
    kernels: bool = typer.Option(False, "--kernels", help="Also AOT-compile every Triton kernel for sm_75..sm_90 "
                                 "and fail on register spills or shared-memory overflow."),
    arch: list[int] = typer.Option(None, "--arch", help="With --kernels: only this compute capability, e.g. 86."),
) -> None:
    """Show versions, CUDA and GPUs (via NVML), the kernel backend, and optionally kernel health.

    Exit 0: healthy; 1: a kernel fails the health check; 2: bad input."""
    from swengine.doctor import collect, render

    report = collect(kernels=kernels, archs=arch or None)
    if as_json:
        print_json(report)
    else:
        typer.echo(render(report))
    if report["kernel_health"] is not None and not report["kernel_health"]["ok"]:
        raise typer.Exit(1)


@app.command()
def plan(
    model: str = typer.Option(..., "--model", "-m", help="Preset (e.g. llama-3.1-8b), HF model directory, config.json, "
                              "or hub id org/name (only its config.json is fetched, through the HF cache)."),
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
    teacher_quant: Literal["none", "nf4", "nf4-dq"] = typer.Option("none", "--teacher-quant",
                                      help="With --teacher: its weights, none (bf16) or NF4."),
    lora_impl: Literal["swkernels", "peft"] = typer.Option("swkernels", "--lora-impl",
                                  help="LoRA layers: swkernels (fused kernels) or peft."),
    loss: Literal["fused", "unfused"] = typer.Option("fused", "--loss",
                             help="fused (chunked linear+CE, no full logits) or unfused (transformers' fp32 logits)."),
    max_ctx: bool = typer.Option(False, "--max-context", help="Also report the longest sequence that fits."),
    prefer: Literal["speed", "memory"] = typer.Option("speed", "--prefer",
                                                      help="speed: the most tokens/s that fits; memory: the "
                                                      "smallest peak (at the same LoRA rank)."),
    alternatives: int = typer.Option(3, "--alternatives", help="How many other setups to list, with why they were "
                                     "not chosen (0: none)."),
    fsdp: int = typer.Option(1, "--fsdp", help="Plan one rank of an N-GPU FSDP2 run (distributed.strategy=fsdp): "
                             "decoder weights, adapters and optimizer states sharded N ways; bf16/fp16 bases."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (specs/plan.schema.json)."),
) -> None:
    """Plan VRAM: memory breakdown, the fastest (or smallest) setup that fits, the best alternatives
    of other kinds with why they lost, and a fits / does-not-fit verdict.

    Exit 0: fits; 1: does not fit; 2: bad input (one line). A --seq-len beyond the model's
    max_position_embeddings is planned but warned about: training at that length needs
    context.rope_scaling."""
    from swengine.planner.cli import make_plan
    from swengine.planner.report import render, to_dict

    if teacher_quant != "none" and not teacher:
        raise UserError(f"--teacher-quant {teacher_quant} needs --teacher MODEL")
    result = make_plan(model, gpu=gpu, vram_gib=vram, seq_len=seq_len, batch=batch, rank=rank, qlora=qlora,
                       teacher=teacher, teacher_quant=teacher_quant, lora_impl=lora_impl, loss=loss,
                       want_max_context=max_ctx, prefer=prefer, alternatives=alternatives, shard_world=fsdp)
    if as_json:
        print_json(to_dict(result))
    else:
        typer.echo(render(result))
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
    prefer: Literal["speed", "memory"] = typer.Option(None, "--prefer", help="With --auto: speed (default, the most "
                                                      "tokens/s that fits) or memory (the smallest peak)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config (and plan) and stop."),
    strict_kernels: bool = typer.Option(False, "--strict-kernels", help="Fail instead of warning when a layer "
                                        "cannot run on swkernels (same as model.strict_kernels=true)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start a new run in a used output_dir; the old run "
                                   "is moved to output_dir/archive/<time>/, never deleted."),
    context: int = typer.Option(None, "--context", min=8, help="Extend the context to this many tokens: phases "
                                "doubling the model's window up to it (or context.phases), RoPE scaled by "
                                "target / original length."),
    rope_scaling: Literal["yarn", "linear", "dynamic", "llama3", "longrope"] = typer.Option(
        None, "--rope-scaling", help="With --context: the RoPE scaling type (default yarn)."),
    teacher: str = typer.Option(None, "--teacher", help="Distil from this teacher model (same as distill.teacher=; "
                                "see distill.kind/temperature/alpha/beta, or distill.cache for an offline teacher)."),
    on_alert: str = typer.Option(None, "--on-alert", metavar="CMD", help="Run CMD (a shell command) for every "
                                 "circuit-breaker trip and a failed end, the event as JSON on stdin (also "
                                 "$SWENGINE_ALERT_MESSAGE/_RULE/_ACTION/_STEP); never blocks training. Same as "
                                 "safety.on_alert=."),
    nproc: int = typer.Option(None, "--nproc", min=1, help="Data parallel over N processes on this machine (one "
                              "per GPU; gloo on CPU): runs this command under torchrun "
                              "(torchrun --nproc-per-node N -m swengine train ... is the same)."),
) -> None:
    """Fine-tune with LoRA/QLoRA. With no arguments: the embedded offline demo (tiny model, CPU-friendly).

    Progress goes to stderr (logging.progress=false keeps only notices); the summary to stdout;
    with --dry-run the resolved config as YAML on stdout. Exit 2: bad input; 3: stopped by a
    failure (non-finite loss, out of memory, disk full); 130/143: stopped by SIGINT/SIGTERM (a
    checkpoint was saved; continue with --resume auto)."""
    from swengine.train.cli import run_train

    if nproc is not None and nproc > 1 and not dry_run:
        from swengine.train.cli import check_before_launch
        from swengine.train.launch import launch

        check_before_launch(args or [], teacher, context)
        launch(nproc, ARGV or sys.argv[1:])
    run_train(args or [], resume=resume, auto=auto or None, gpu=gpu, dry_run=dry_run,
              strict_kernels=strict_kernels, overwrite=overwrite, context=context, rope_scaling=rope_scaling,
              teacher=teacher, on_alert=on_alert, prefer=prefer)


@app.command()
def merge(
    run_or_adapter: str = typer.Argument(..., help="A run directory (its adapter/) or an adapter directory."),
    out: str = typer.Option(..., "--out", help="Where to write the merged model."),
    base: str = typer.Option(None, "--base", help="Base model path (default: the adapter's base_model_name_or_path)."),
    dtype: Literal["fp32", "bf16", "fp16"] = typer.Option("fp32", "--dtype",
                              help="Weights dtype of the merged model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out (never the base model's "
                                   "directory)."),
) -> None:
    """Merge a LoRA adapter into its base model and save a model transformers loads directly.

    The model is written to a temporary sibling of --out and renamed into place, so a failed merge
    leaves no partial model and an existing --out intact."""
    from swengine.train.merge import merge as do_merge

    path = do_merge(run_or_adapter, out, base, dtype, overwrite=overwrite)
    typer.echo(f"merged model written to {path}  (AutoModelForCausalLM.from_pretrained({str(path)!r}))")


from swengine.eval.cli import eval_command  # noqa: E402  (typer + stdlib only at import)

app.command("eval")(eval_command)
from swengine.distill.cli import distill_cache_command  # noqa: E402  (typer + stdlib at import)

app.command("distill-cache")(distill_cache_command)
from swengine.train.rollback_cli import rollback_command  # noqa: E402  (typer + stdlib at import)

app.command("rollback")(rollback_command)
from swengine.report.cli import report_command  # noqa: E402  (typer + stdlib at import)

app.command("report")(report_command)


def _fail(message: str, code: int, as_json: bool, hint: str | None = None, prefix: str = "error: ") -> None:
    """One line on stderr, or with --json a JSON error on stdout ({"error", "hint"}); then exit."""
    if as_json:
        print_json({"error": message.removeprefix("error: "), "hint": hint, "exit_code": code})
    else:
        typer.echo(prefix + message + (f"; {hint}" if hint else ""), err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every ending has its exit code (:data:`EXIT_CODES`) and at most one
    line of explanation; no tracebacks for user errors, failures or interrupts."""
    from swengine.train.stops import FAILED, RunStopped
    from swkernels._backend import BackendError

    args = sys.argv[1:] if argv is None else list(argv)
    ARGV[:] = args
    as_json = "--json" in args
    try:
        code = app(args=args, prog_name="swengine", standalone_mode=False)
    except typer.TyperException as exc:  # usage: unknown option, bad choice, missing argument
        if as_json or not hasattr(exc, "show"):
            _fail(exc.format_message(), 2, as_json, "see --help")
        exc.show()
        sys.exit(2)
    except typer.Abort:
        _fail("interrupted", 130, as_json)
    except (UserError, BackendError) as exc:
        message, _, hint = str(exc).partition("; ")
        _fail(message, 2, as_json, hint or None)
    except RunStopped as exc:  # its message says how the run ended ("stopped by SIGTERM ...", "error: ...")
        _fail(str(exc), exc.code, as_json, prefix="")
    except KeyboardInterrupt:
        _fail("interrupted", 130, as_json)
    except MemoryError:
        _fail("out of host memory", FAILED, as_json, "lower schedule.micro_batch_size or data.max_seq_len")
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch's, outside training (which says more)
            raise
        _fail(f"out of GPU memory: {str(exc).splitlines()[0]}", FAILED, as_json,
              "free the GPU or plan a smaller setup with swengine plan")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
