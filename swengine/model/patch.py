"""Patch a Hugging Face causal LM for training by swapping module instances (never by
reassigning anything inside transformers), and undo it.

* linear projections named in the LoRA targets → :class:`swkernels.nn.LoRALinear` (holding the
  frozen nn.Linear or bitsandbytes NF4 Linear4bit as ``base_layer``)
* rotary embedding → :class:`swkernels.nn.RotaryEmbedding`, which hands inv_freq + positions to
* each decoder layer's attention → :class:`FusedAttention` (one ``swkernels::rope`` launch for q and k)
* each gated MLP → :class:`FusedMLP` (``swkernels::silu_mul`` / ``swkernels::gelu_mul``)
* every RMSNorm (decoder, final, q/k norms) → :class:`swkernels.nn.RMSNorm` (``swkernels::rms_norm``)
The fused linear cross-entropy is not a module: :mod:`swengine.train.step` calls it on the
model's final hidden states. What the patcher does not recognise stays on the transformers path,
named in one warning line (an error with ``strict``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from swengine.errors import UserError
from swengine.model.families import Family, activation_of
from swengine.model.families import family as family_by_type
from swkernels.nn import LoRALinear, RotaryEmbedding, replace_rotary
from swkernels.nn.norm import RMSNorm, is_hf_rms_norm

log = logging.getLogger("swengine")


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
    kept: list[str] = field(default_factory=list)  # what stayed on the transformers path, and why
    _swapped: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, attr, original)
    _fused_rotaries: list[RotaryEmbedding] = field(default_factory=list)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.lora.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]

    def undo(self) -> None:
        """Put every original module back (the adapters are dropped)."""
        for rotary in self._fused_rotaries:
            rotary.fused = False
        for parent, name, original in reversed(self._swapped):
            setattr(parent, name, original)
        self._swapped.clear()
        self._fused_rotaries.clear()
        self.lora.clear()


def family_of(model: nn.Module) -> Family:
    return family_by_type(getattr(getattr(model, "config", None), "model_type", None))


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    fam = family_of(model)
    targets = tuple(targets)
    if targets == ("all-linear",):
        return fam.projections
    unknown = [t for t in targets if t not in fam.projections]
    if unknown:
        raise UserError(f"LoRA target(s) {', '.join(unknown)} are not projections of a {fam.name} layer; "
                        f"choose from {', '.join(fam.projections)} or 'all-linear'")
    return targets


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Linear4bit"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (the ModuleList whose entries are *DecoderLayer modules)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and "DecoderLayer" in type(module[0]).__name__:
            return list(module)
    return []


def patch(model: nn.Module, lora: LoraSpec | None = None, kernels: bool = True, strict: bool = False) -> PatchHandle:
    """Freeze the model, add LoRA adapters to the target projections and (``kernels``) swap the
    rotary module, attention, MLP and RMSNorms for ours. Anything not recognised keeps its
    transformers module with one warning line; ``strict`` turns that into a :class:`UserError`."""
    fam = family_of(model)
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
                    _swap(handle, parent, child_name, layer)
                    handle.lora[f"{path}.{child_name}" if path else child_name] = layer
        if not handle.lora:
            raise UserError(f"no linear layer named {', '.join(names)} found to adapt")
    if kernels:
        _swap_kernels(model, fam, handle)
        if handle.kept:
            message = f"{fam.name}: kept the transformers path for " + "; ".join(handle.kept)
            if strict:
                handle.undo()
                raise UserError(message + " (drop --strict-kernels to train anyway)")
            log.warning("swengine: %s", message)
    return handle


def _swap(handle: PatchHandle, parent: nn.Module, name: str, new: nn.Module) -> None:
    handle._swapped.append((parent, name, getattr(parent, name)))
    setattr(parent, name, new)


def _swap_kernels(model: nn.Module, fam: Family, handle: PatchHandle) -> None:
    from swengine.model.fused_attention import FusedAttention
    from swengine.model.fused_mlp import KERNELS, FusedMLP

    replace_rotary(model, handle._swapped)
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    layers = decoder_layers(model)
    if not layers:
        handle.kept.append("every layer (no *DecoderLayer list found)")
        return
    # attention: all layers or none, since the shared rotary module either hands out tables or RopeArgs
    qkv = ("qkv_proj",) if fam.fused_qkv else ("q_proj", "k_proj", "v_proj")
    attn_ok = all(hasattr(layer, "self_attn") and all(hasattr(layer.self_attn, n) for n in (*qkv, "o_proj"))
                  for layer in layers)
    if not rotaries or not all(isinstance(r, RotaryEmbedding) for r in rotaries):
        handle.kept.append("attention (its rotary embedding could not be replaced)")
    elif not attn_ok:
        handle.kept.append(f"attention (a layer lacks {'/'.join((*qkv, 'o_proj'))})")
    else:
        for layer in layers:
            _swap(handle, layer, "self_attn", FusedAttention(layer.self_attn, fam.fused_qkv))
        for rotary in rotaries:
            rotary.fused = True
            handle._fused_rotaries.append(rotary)
    activation = activation_of(model.config)
    mlp_names = ("gate_up_proj", "down_proj") if fam.fused_gate_up else ("gate_proj", "up_proj", "down_proj")
    if activation not in KERNELS:
        handle.kept.append(f"mlp (activation {activation!r} has no fused kernel)")
    elif not all(hasattr(layer, "mlp") and all(hasattr(layer.mlp, n) for n in mlp_names) for layer in layers):
        handle.kept.append(f"mlp (a layer lacks {'/'.join(mlp_names)})")
    else:
        for layer in layers:
            _swap(handle, layer, "mlp", FusedMLP(layer.mlp, activation, fam.fused_gate_up))
    other_norms = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            style = is_hf_rms_norm(child)
            if style is not None:
                _swap(handle, parent, name, RMSNorm.from_hf(child))
            elif type(child).__name__.endswith("RMSNorm"):
                other_norms.append(type(child).__name__)
    if other_norms:
        handle.kept.append(f"norms ({', '.join(sorted(set(other_norms)))} not recognised)")
