"""The one table of supported model families: what the loader accepts, what the patcher swaps and
what the planner models all read from here.

A family names its decoder layer's projections (LoRA targets), how q/k/v are produced (three
projections, or Phi-3's fused ``qkv_proj``), its MLP (gate/up → activation → down, or Phi-3's fused
``gate_up_proj``), its activation (SwiGLU or Gemma's GELU-tanh gate), its RMSNorm style (Llama's
``w · x̂`` cast before the multiply, or Gemma's ``(1 + w) · x̂`` in fp32) and whether attention has
q/k norms (Qwen3, Gemma 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from swengine.errors import UserError

_LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    projections: tuple[str, ...] = _LLAMA_PROJ  # LoRA targets of one decoder layer ("all-linear")
    fused_qkv: bool = False  # Phi-3: one qkv_proj, split as [q | k | v]
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, split as [gate | up]
    activation: str = "silu"  # the config's hidden_act / hidden_activation we expect
    norm: str = "llama"  # "llama": w · x̂.to(dtype);  "gemma": ((1 + w) · x̂).to(dtype)
    qk_norm: bool = False  # q_norm / k_norm on each head before RoPE


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama"),
    Family("mistral"),
    Family("qwen2"),
    Family("qwen3", qk_norm=True),
    Family("phi3", projections=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), fused_qkv=True,
           fused_gate_up=True),
    Family("gemma", activation="gelu_pytorch_tanh", norm="gemma"),
    Family("gemma2", activation="gelu_pytorch_tanh", norm="gemma"),
    Family("gemma3_text", activation="gelu_pytorch_tanh", norm="gemma", qk_norm=True),
)}


def family(model_type: str | None) -> Family:
    """The family of a transformers ``model_type``, or a one-line error naming the supported ones."""
    if model_type not in FAMILIES:
        raise UserError(f"unsupported architecture {model_type!r}; supported families: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def activation_of(config) -> str:
    """The MLP activation a config asks for (Gemma names it hidden_activation)."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu"
