"""LoRA adapters in PEFT's on-disk format, so ``PeftModel.from_pretrained`` loads ours unchanged.

Files: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from swengine.errors import UserError
from swengine.model.patch import LoraSpec, PatchHandle

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_config(spec: LoraSpec, target_names: tuple[str, ...], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "bias": "none",
        "target_modules": sorted(target_names),
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def adapter_state(handle: PatchHandle) -> dict[str, torch.Tensor]:
    state = {}
    for path, layer in handle.lora.items():
        state[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu").contiguous()
        state[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu").contiguous()
    return state


def save_adapter(handle: PatchHandle, spec: LoraSpec, out_dir: str | Path, base_model: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(handle), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(adapter_config(spec, handle.target_names, base_model), indent=2) + "\n")
    return out


def read_adapter_config(path: str | Path) -> dict:
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        raise UserError(f"{path} is not a LoRA adapter directory (no {CONFIG_NAME})")
    return json.loads(p.read_text())


def spec_from_config(cfg: dict) -> LoraSpec:
    return LoraSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                    targets=tuple(cfg["target_modules"]), use_rslora=bool(cfg.get("use_rslora", False)))


@torch.no_grad()
def load_adapter_into(handle: PatchHandle, path: str | Path) -> None:
    """Copy a PEFT-format adapter's weights into a model patched with the same targets and rank."""
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    expected = {f"{PREFIX}{p}.lora_{ab}.weight" for p in handle.lora for ab in ("A", "B")}
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise UserError(f"adapter {path} does not match the model: {len(missing)} missing and {len(extra)} unexpected "
                        f"tensors (e.g. {sorted(missing or extra)[0]})")
    for p, layer in handle.lora.items():
        layer.lora_A.weight.copy_(state[f"{PREFIX}{p}.lora_A.weight"])
        layer.lora_B.weight.copy_(state[f"{PREFIX}{p}.lora_B.weight"])
