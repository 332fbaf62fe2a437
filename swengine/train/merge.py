"""Merge a LoRA adapter into its base model's weights (W += scaling·B·A) and save a plain
transformers model. Uses PEFT's own loader and merge, which is also the proof that our adapter
files are PEFT's format."""

from __future__ import annotations

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


def merge(run_or_adapter: str, out: str, base: str | None = None, dtype: str = "fp32") -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = find_adapter(run_or_adapter)
    base_path = base or read_adapter_config(adapter)["base_model_name_or_path"]
    base_path = model_load.model_path(base_path)
    if dtype not in model_load.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(model_load.DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=model_load.DTYPES[dtype])
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        merged.save_pretrained(str(out_dir))
    model_load.load_tokenizer(base_path).save_pretrained(str(out_dir))
    return out_dir
