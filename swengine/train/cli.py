"""`swengine train`: config + overrides → (optional plan) → Trainer → summary."""

from __future__ import annotations

import math
from pathlib import Path

import typer
import yaml

from swengine.config import TrainConfig, explicit_values, load_config
from swengine.errors import UserError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "demo.yaml"


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument may be a YAML file; the rest (and any "key=value") are overrides.
    Without a YAML file and without model.path, the base config is the embedded demo's."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    if not any(a.startswith("model.path=") for a in args):
        return str(DEMO_CONFIG), args
    return None, args


def notice(message: str) -> None:
    """Progress and notices go to stderr; stdout keeps the command's result. Under torchrun only
    rank 0 speaks."""
    from swengine.train.distributed import is_main_process

    if is_main_process():
        typer.echo(message, err=True)


def _plan(cfg: TrainConfig, gpu: str | None, seq_len: int, rank: int | None = None, fixed: dict | None = None,
          prefer: str = "speed"):
    from swengine.model import load as model_load
    from swengine.planner.cli import make_plan
    from swengine.train import distributed

    d = cfg.distill  # an online teacher shares the card: the plan includes it
    # a per-GPU plan: under N ranks each plans 1/N of the global batch, so the accumulation it picks
    # keeps micro × accumulation × N at (or just above) micro_batch_size × grad_accumulation
    world = distributed.world_size()
    batch = math.ceil(cfg.schedule.micro_batch_size * cfg.schedule.grad_accumulation / world)
    return make_plan(model_load.model_path(cfg.model.path), gpu=gpu, seq_len=seq_len, batch=batch, rank=rank,
                     qlora=True if cfg.quantization.load_in_4bit else None, lora_impl=cfg.lora.impl,
                     loss="fused" if cfg.fused_loss else "unfused",
                     teacher=model_load.model_path(d.teacher) if d.teacher else None,
                     teacher_quant="nf4-dq" if d.teacher_4bit else "none", fixed=fixed, prefer=prefer,
                     shard_world=world if cfg.distributed.strategy == "fsdp" else 1)


# the config keys --auto sets, and the word of the plan's reasons that explains each
PLANNED = {"lora.rank": "LoRA rank", "lora.alpha": "LoRA rank", "schedule.micro_batch_size": "micro-batch",
           "schedule.grad_accumulation": "micro-batch", "checkpointing.gradient_checkpointing": "checkpointing",
           "optim.name": "optimizer", "quantization.load_in_4bit": "base weights",
           "quantization.double_quant": "base weights"}


def _planned_values(result) -> dict:
    """The config keys a plan sets, and their values."""
    s = result.setup
    return {"lora.rank": s.lora_rank, "lora.alpha": float(2 * s.lora_rank),
            "schedule.micro_batch_size": s.micro_batch, "schedule.grad_accumulation": result.grad_accumulation,
            "checkpointing.gradient_checkpointing": s.checkpointing, "optim.name": s.optimizer,
            "quantization.load_in_4bit": s.quant != "none", "quantization.double_quant": s.quant == "nf4-dq"}


def _pinned(cfg: TrainConfig, explicit: set[str] | frozenset) -> dict:
    """The setup fields the user fixed by writing their keys: the planner plans around them."""
    fixed = {}
    if "schedule.micro_batch_size" in explicit:
        fixed["micro_batch"] = cfg.schedule.micro_batch_size
    if "checkpointing.gradient_checkpointing" in explicit:
        fixed["checkpointing"] = cfg.checkpointing.gradient_checkpointing
    if "optim.name" in explicit:
        fixed["optimizer"] = cfg.optim.name
    if "quantization.load_in_4bit" in explicit:
        q = cfg.quantization
        fixed["quant"] = ("nf4-dq" if q.double_quant else "nf4") if q.load_in_4bit else "none"
    return fixed


def apply_plan(cfg: TrainConfig, gpu: str | None, explicit: set[str] | frozenset = frozenset(),
               prefer: str = "speed") -> None:
    """Ask the planner for this GPU (at the longest training length) and write its choices into
    the config. Keys the user wrote (``explicit``) are constraints the search plans around; a
    kept setup that cannot fit is an error naming the closest one that does. The plan and the
    table of what --auto changed go to stderr, so ``--auto --dry-run`` prints pure YAML on stdout."""
    from swengine.planner.report import render
    from swengine.planner.search import SAFETY_MARGIN, GiB

    rank = cfg.lora.rank if "lora.rank" in explicit else None
    fixed = _pinned(cfg, explicit)
    result = _plan(cfg, gpu, cfg.data.max_seq_len, rank, fixed, prefer)
    if not result.fits and fixed:
        free = _plan(cfg, gpu, cfg.data.max_seq_len, rank)  # the closest: the rest free, the rank kept
        if free.fits:
            closest = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                               for k, v in _planned_values(free).items()
                               if k not in ("lora.alpha", "quantization.double_quant"))
            raise UserError(f"--auto: the setup you set ({', '.join(f'{k}={v}' for k, v in fixed.items())}) needs at "
                            f"least {result.estimate.total_vram / GiB:.2f} GiB, more than the usable "
                            f"{free.vram_bytes * SAFETY_MARGIN / GiB:.2f} GiB on {free.gpu}; the closest setup that fits: "
                            f"{closest}")
    notice(render(result))
    if not result.fits:
        raise UserError(f"the planner finds no setup that fits: {result.reasons[0]}")
    no_nf4 = result.setup.quant == "none"
    changed, kept = [], []
    for key, value in _planned_values(result).items():
        section, name = key.split(".")
        before = getattr(getattr(cfg, section), name)
        if key in explicit:
            kept.append(f"{key}={before}")
        elif before != value:
            setattr(getattr(cfg, section), name, value)
            if key == "quantization.double_quant" and no_nf4:
                continue  # no NF4: double quant means nothing, not worth a line
            why = next((r for r in result.reasons if PLANNED[key].lower() in r.lower()
                        or (key == "optim.name" and "adamw" in r.lower())), "")
            changed.append((key, str(before), str(value), why))
    if changed:
        width = max(len(k) for k, *_ in changed)
        rows = [f"  {k:<{width}}  {b:>8} -> {v:<8}  {why}" for k, b, v, why in changed]
        notice("--auto changed (keys you did not set):\n" + "\n".join(rows))
    if kept:
        notice(f"--auto planned around what you set: {', '.join(kept)}")


def phase_planner(cfg: TrainConfig, gpu: str | None, prefer: str = "speed"):
    """--auto with context phases: the planner's micro-batch, accumulation and checkpointing for
    each phase's length, at the run's LoRA rank."""
    from swengine.train.phases import PhaseSetup

    def plan_for(seq_len: int) -> PhaseSetup:
        result = _plan(cfg, gpu, seq_len, cfg.lora.rank, prefer=prefer)
        if not result.fits:
            raise UserError(f"the planner finds no setup for the {seq_len}-token phase: {result.reasons[0]}")
        notice(f"--auto: {seq_len}-token phase: micro-batch {result.setup.micro_batch} × accumulation "
               f"{result.grad_accumulation}, checkpointing {'on' if result.setup.checkpointing else 'off'}")
        return PhaseSetup(result.setup.micro_batch, result.grad_accumulation, result.setup.checkpointing)

    return plan_for


def apply_context(cfg: TrainConfig, explicit: set[str], context: int | None, rope_type: str | None) -> None:
    """``--context N [--rope-scaling TYPE]``: the target length, the RoPE scaling (factor N / the
    model's window unless context.rope_scaling gives one) and, without context.phases, phases
    doubling the window up to N."""
    from swengine.model import load as model_load
    from swengine.model.config import load_model_config
    from swengine.train.phases import doubling_phases

    if context is None:
        if rope_type is not None:
            raise UserError("--rope-scaling needs --context N (the target length)")
        return
    native = getattr(load_model_config(model_load.model_path(cfg.model.path)), "max_position_embeddings", None)
    if not isinstance(native, int):
        raise UserError("the model config has no max_position_embeddings; give context.rope_scaling and "
                        "context.phases explicitly")
    if cfg.context.phases:
        if cfg.context.phases[-1] != context:
            raise UserError(f"--context {context} differs from the last of context.phases={cfg.context.phases}; "
                            "drop one of them or make them agree")
        if context <= native:
            raise UserError(f"--context {context} is not beyond the model's {native} positions; context extension "
                            f"needs a longer target (e.g. --context {native * 4})")
    else:
        cfg.context.phases = doubling_phases(native, context)
    params = dict(cfg.context.rope_scaling)
    if rope_type is not None:
        if params and params.get("rope_type", params.get("type")) not in (None, rope_type):
            raise UserError(f"--rope-scaling {rope_type} differs from context.rope_scaling={params}; drop one of them")
        params["rope_type"] = rope_type
    params.setdefault("rope_type", "yarn")
    params.setdefault("factor", context / native)
    if params["rope_type"] == "llama3":  # Llama 3.1's published values
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    elif params["rope_type"] == "longrope" and "long_factor" not in params:
        # without searched per-dimension factors: uniform ones, i.e. interpolation by `factor` at long
        # lengths with LongRoPE's attention scaling; a LongRoPE search's factors do better
        half = _rotary_half_dim(cfg)
        params.setdefault("long_factor", [params["factor"]] * half)
        params.setdefault("short_factor", [1.0] * half)
        notice(f"--rope-scaling longrope: uniform long_factor={params['factor']:g} over {half} frequencies (no "
               "searched factors given; set context.rope_scaling.long_factor/short_factor from a LongRoPE search)")
    cfg.context.rope_scaling = params
    cfg.data.max_seq_len = context


def _rotary_half_dim(cfg: TrainConfig) -> int:
    """How many rotary frequencies the model has (head_dim × partial_rotary_factor / 2)."""
    from swengine.model import load as model_load
    from swengine.model.config import load_model_config

    config = load_model_config(model_load.model_path(cfg.model.path))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * getattr(config, "partial_rotary_factor", 1.0)) // 2


def check_before_launch(args: list[str], teacher: str | None, context: int | None) -> None:
    """--nproc: bad input is one line (exit 2) here, before torchrun starts the ranks."""
    from swengine.train.distributed import check_supported

    path, overrides = split_args(args)
    cfg = load_config(path, overrides)
    if teacher is not None or context is not None:
        raise UserError(f"{'--teacher' if teacher is not None else '--context'} is not supported with more than one "
                        "process yet; run it without --nproc / torchrun")
    check_supported(cfg)


def run_train(args: list[str], resume: str | None, auto: bool | None, gpu: str | None, dry_run: bool,
              strict_kernels: bool = False, overwrite: bool = False, context: int | None = None,
              rope_scaling: str | None = None, teacher: str | None = None, on_alert: str | None = None,
              prefer: str | None = None) -> None:
    from swengine.train.trainer import Trainer

    path, overrides = split_args(args)
    if teacher is not None:
        overrides = [*overrides, f"distill.teacher={teacher}"]
    if on_alert is not None:
        overrides = [*overrides, f"safety.on_alert={on_alert}"]
    cfg = load_config(path, overrides)
    given = explicit_values(path, overrides)
    explicit = set(given)
    cfg.model.strict_kernels = cfg.model.strict_kernels or strict_kernels
    apply_context(cfg, explicit, context, rope_scaling)
    if cfg.context.phases and "data.max_seq_len" in given and int(given["data.max_seq_len"]) != cfg.context.phases[-1]:
        notice(f"context phases {cfg.context.phases} set the training lengths: data.max_seq_len="
               f"{given['data.max_seq_len']} is replaced by the target {cfg.context.phases[-1]}")
    plan_for = None
    if auto or cfg.auto:
        apply_plan(cfg, gpu, explicit, prefer or "speed")
        if cfg.context.phases:
            plan_for = phase_planner(cfg, gpu, prefer or "speed")
    elif gpu or prefer:
        raise UserError(f"{'--gpu' if gpu else '--prefer'} only applies with --auto")
    if dry_run:
        if plan_for is not None:
            from swengine.train.phases import describe, resolve

            notice(describe(resolve(cfg, explicit, plan_for)))
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        return
    from swengine.train import distributed

    dist = distributed.init(cfg.distributed.timeout_s, cfg.distributed.strategy)
    try:
        result = Trainer(cfg, resume=resume, log=notice, overwrite=overwrite, explicit=explicit,
                         plan_for=plan_for, dist=dist).run()
    finally:
        dist.close()
    if not dist.main:
        return
    out = Path(result.output_dir)
    typer.echo("")
    if result.first_eval_loss is not None and result.eval_loss is not None:
        typer.echo(f"eval loss: {result.first_eval_loss:.4f} -> {result.eval_loss:.4f}")
    if result.skill_before is not None:
        typer.echo(f"demo skill (reverse a list of words, exact match on 50 held-out prompts): "
                   f"{100 * result.skill_before:.0f}% before -> {100 * result.skill_after:.0f}% after")
    typer.echo(f"adapter (PEFT format): {result.adapter_dir}")
    typer.echo(f"metrics: {out / 'metrics.jsonl'}   checkpoints: {out / 'checkpoints'}")
    extended = cfg.context.rope_scaling  # the base loads with the extended config saved next to the adapter
    typer.echo("load it with:\n"
               "  from peft import PeftModel\n"
               f"  from transformers import {'AutoConfig, ' if extended else ''}AutoModelForCausalLM\n"
               f"  base = AutoModelForCausalLM.from_pretrained({_base(result.adapter_dir)!r}"
               + (f", config=AutoConfig.from_pretrained({str(result.adapter_dir)!r}))\n" if extended else ")\n")
               + f"  model = PeftModel.from_pretrained(base, {str(result.adapter_dir)!r})\n"
               f"or merge it: swengine merge {out} --out {out / 'merged'}")


def _base(adapter_dir: Path) -> str:
    from swengine.model.adapter import read_adapter_config

    return read_adapter_config(adapter_dir)["base_model_name_or_path"]
