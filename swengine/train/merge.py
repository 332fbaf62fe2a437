"""Merge a LoRA adapter into its base model's weights (W += scaling·B·A) and save a plain
transformers model. Uses PEFT's own loader and merge, which is also the proof that our adapter
files are PEFT's format."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from swengine.errors import UserError
from swengine.model import load as model_load
from swengine.model.adapter import read_adapter_config


def find_adapter(run_or_adapter: str) -> Path:
    p = Path(run_or_adapter)
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise UserError(f"{run_or_adapter}: no adapter_config.json there or in its adapter/ folder; pass a run "
                    "directory or an adapter directory")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_out(out: str, base_path: str, adapter: Path, overwrite: bool) -> Path:
    """The resolved --out directory, or a one-line error: never the base model's directory (nor a
    folder holding it, nor the adapter's run), never a file, a non-empty one only with --overwrite."""
    out_dir = Path(out).expanduser().resolve()
    base_dir = Path(base_path).expanduser()
    if base_dir.exists():
        base_dir = base_dir.resolve()
        if _inside(out_dir, base_dir) or _inside(base_dir, out_dir):
            raise UserError(f"--out {out} is the base model's directory {base_dir} (or holds it / lies inside it); "
                            "merging there would destroy the base model, so pick another --out")
    run = adapter.resolve()
    protect = run.parent if run.name == "adapter" else run
    if _inside(protect, out_dir) or _inside(out_dir, run):
        raise UserError(f"--out {out} would overwrite the adapter being merged ({run}); pick another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; pick another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it or pick another --out")
    return out_dir


def _save_atomically(model, tokenizer, out_dir: Path) -> None:
    """Write into a temporary sibling, then swap it in: a failure leaves no partial model and an old
    --out untouched."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    old = out_dir.parent / f".{out_dir.name}.old-{tag}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        with torch.no_grad():
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        moved = False
        if out_dir.exists():
            os.replace(out_dir, old)
            moved = True
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if moved:
                os.replace(old, out_dir)
            raise
    except OSError as exc:
        raise UserError(f"cannot write the merged model to {out_dir}: {exc.strerror or exc}; nothing was "
                        "changed there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_dir.exists():  # swapped in (or the old one restored): the set-aside copy is no longer needed
            shutil.rmtree(old, ignore_errors=True)


def merge(run_or_adapter: str, out: str, base: str | None = None, dtype: str = "fp32", overwrite: bool = False) -> Path:
    adapter = find_adapter(run_or_adapter)
    base_path = base or read_adapter_config(adapter)["base_model_name_or_path"]
    base_path = model_load.model_path(base_path)
    if dtype not in model_load.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(model_load.DTYPES)}")
    out_dir = check_out(out, base_path, adapter, overwrite)
    from peft import PeftModel  # after the checks: importing it can print library warnings
    from safetensors import SafetensorError

    config = model_load.extended_config(adapter)  # a context-extended run: the base with its rope parameters
    kwargs = {"config": config} if config is not None else {}
    model = model_load.from_pretrained_checked(base_path, dtype=model_load.DTYPES[dtype], **kwargs)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load the adapter {adapter} onto {base_path}: {first}") from None
    _save_atomically(merged, model_load.load_tokenizer(base_path), out_dir)
    return out_dir
