"""Patch a Hugging Face causal LM for training by swapping module instances (never by
reassigning anything inside transformers), and undo it.

* linear projections named in the LoRA targets → :class:`swkernels.nn.LoRALinear` (holding the
  frozen nn.Linear or bitsandbytes NF4 Linear4bit as ``base_layer``)
* rotary embedding → :class:`swkernels.nn.RotaryEmbedding`
The fused linear cross-entropy is not a module: :mod:`swengine.train.step` calls it on the
model's final hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from swengine.errors import UserError
from swkernels.nn import LoRALinear, replace_rotary

# family → the projection names of a decoder layer ("all-linear" expands to these)
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all-linear",)
    use_rslora: bool = False


@dataclass
class PatchHandle:
    model: nn.Module
    lora: dict[str, LoRALinear] = field(default_factory=dict)  # module path → adapter layer
    target_names: tuple[str, ...] = ()
    _swapped: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, attr, original)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.lora.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]

    def undo(self) -> None:
        """Put every original module back (the adapters are dropped)."""
        for parent, name, original in reversed(self._swapped):
            setattr(parent, name, original)
        self._swapped.clear()
        self.lora.clear()


def family_of(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"unsupported architecture {model_type!r}; supported families: {', '.join(FAMILIES)}")
    return model_type


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    family = family_of(model)
    targets = tuple(targets)
    if targets == ("all-linear",):
        return FAMILIES[family]
    unknown = [t for t in targets if t not in FAMILIES[family]]
    if unknown:
        raise UserError(f"LoRA target(s) {', '.join(unknown)} are not projections of a {family} layer; "
                        f"choose from {', '.join(FAMILIES[family])} or 'all-linear'")
    return targets


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Linear4bit"


def patch(model: nn.Module, lora: LoraSpec | None = None, rope: bool = True) -> PatchHandle:
    """Freeze the model, add LoRA adapters to the target projections, swap the rotary module."""
    family_of(model)
    model.requires_grad_(False)
    handle = PatchHandle(model)
    if lora is not None:
        if lora.rank < 1:
            raise UserError(f"lora.rank must be > 0 (got {lora.rank})")
        names = resolve_targets(model, lora.targets)
        handle.target_names = names
        for path, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in names and _is_linear(child):
                    layer = LoRALinear(child, lora.rank, lora.alpha, lora.dropout, lora.use_rslora)
                    setattr(parent, child_name, layer)
                    handle._swapped.append((parent, child_name, child))
                    handle.lora[f"{path}.{child_name}" if path else child_name] = layer
        if not handle.lora:
            raise UserError(f"no linear layer named {', '.join(names)} found to adapt")
    if rope:
        replace_rotary(model, handle._swapped)
    return handle
