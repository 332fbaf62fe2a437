"""`swengine train`: config + overrides → (optional plan) → Trainer → summary."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from swengine.config import TrainConfig, load_config
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
    """Progress and notices go to stderr; stdout keeps the command's result."""
    typer.echo(message, err=True)


def apply_plan(cfg: TrainConfig, gpu: str | None) -> None:
    """Ask the planner for this GPU and write its choices into the config (the plan table goes
    to stderr, so ``--auto --dry-run`` prints pure YAML on stdout)."""
    from swengine.model import load as model_load
    from swengine.planner.cli import make_plan
    from swengine.planner.report import render

    model = model_load.model_path(cfg.model.path)
    result = make_plan(model, gpu=gpu, seq_len=cfg.data.max_seq_len,
                       batch=cfg.schedule.micro_batch_size * cfg.schedule.grad_accumulation,
                       qlora=True if cfg.quantization.load_in_4bit else None, lora_impl=cfg.lora.impl,
                       loss="fused" if cfg.fused_loss else "unfused")
    notice(render(result))
    if not result.fits:
        raise UserError(f"the planner finds no setup that fits: {result.reasons[0]}")
    s = result.setup
    cfg.lora.rank = s.lora_rank
    cfg.lora.alpha = float(2 * s.lora_rank)
    cfg.schedule.micro_batch_size = s.micro_batch
    cfg.schedule.grad_accumulation = result.grad_accumulation
    cfg.checkpointing.gradient_checkpointing = s.checkpointing
    cfg.optim.name = s.optimizer
    cfg.quantization.load_in_4bit = s.quant != "none"
    cfg.quantization.double_quant = s.quant == "nf4-dq"


def run_train(args: list[str], resume: str | None, auto: bool | None, gpu: str | None, dry_run: bool,
              strict_kernels: bool = False, overwrite: bool = False) -> None:
    from swengine.train.trainer import Trainer

    path, overrides = split_args(args)
    cfg = load_config(path, overrides)
    cfg.model.strict_kernels = cfg.model.strict_kernels or strict_kernels
    if auto or cfg.auto:
        apply_plan(cfg, gpu)
    elif gpu:
        raise UserError("--gpu only applies with --auto")
    if dry_run:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        return
    result = Trainer(cfg, resume=resume, log=notice, overwrite=overwrite).run()
    out = Path(result.output_dir)
    typer.echo("")
    if result.first_eval_loss is not None and result.eval_loss is not None:
        typer.echo(f"eval loss: {result.first_eval_loss:.4f} -> {result.eval_loss:.4f}")
    if result.skill_before is not None:
        typer.echo(f"demo skill (reverse a list of words, exact match on 50 held-out prompts): "
                   f"{100 * result.skill_before:.0f}% before -> {100 * result.skill_after:.0f}% after")
    typer.echo(f"adapter (PEFT format): {result.adapter_dir}")
    typer.echo(f"metrics: {out / 'metrics.jsonl'}   checkpoints: {out / 'checkpoints'}")
    typer.echo("load it with:\n"
               "  from peft import PeftModel\n"
               "  from transformers import AutoModelForCausalLM\n"
               f"  base = AutoModelForCausalLM.from_pretrained({_base(result.adapter_dir)!r})\n"
               f"  model = PeftModel.from_pretrained(base, {str(result.adapter_dir)!r})\n"
               f"or merge it: swengine merge {out} --out {out / 'merged'}")


def _base(adapter_dir: Path) -> str:
    from swengine.model.adapter import read_adapter_config

    return read_adapter_config(adapter_dir)["base_model_name_or_path"]
