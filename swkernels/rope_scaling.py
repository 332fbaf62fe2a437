"""Rotary inverse frequencies and attention factor for every context-extension scaling.

d = rotary dim (head_dim · partial_rotary_factor), b = rope_theta, θ_i = b^(−2i/d), i < d/2,
s = factor, L0 = original_max_position_embeddings. cos/sin are multiplied by the attention factor.

* default:  θ_i
* linear (position interpolation): θ_i / s
* dynamic NTK: with L = max(seq_len, max_position_embeddings),
  b' = b·(s·L/max_pos − (s − 1))^(d/(d−2)); a pure function of seq_len (no history, see below)
* yarn: ramp γ_i = clamp((i − low)/(high − low), 0, 1) over the correction range for beta_fast /
  beta_slow (floored/ceiled unless truncate=False), inv_freq = θ_i/s · γ_i + θ_i · (1 − γ_i);
  attention factor 0.1·ln s + 1 (or mscale/mscale_all_dim ratio, or the given one)
* llama3: wavelength λ_i = 2π/θ_i; keep θ_i where λ < L0/high_freq_factor, θ_i/s where
  λ > L0/low_freq_factor, and blend in between with σ = (L0/λ − low)/(high − low)
* longrope: θ_i / ext_i with ext = long_factor if seq_len > L0 else short_factor; attention
  factor √(1 + ln s / ln L0) (s = max_pos / L0 unless given)

Config parsing reuses transformers' own normalisation (``standardize_rope_params``: legacy
``rope_scaling`` → ``rope_parameters``); the arithmetic is ours, done in fp32 in transformers'
operation order (e.g. YaRN's θ/s as 1/(s·b^e), LongRoPE's as 1/(ext·b^e)), so it is tested
bitwise equal to ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str
    theta: float
    dim: int  # rotary dims (even)
    head_dim: int
    max_position_embeddings: int
    params: dict  # the rest of rope_parameters (factor, beta_fast, ...)

    @property
    def original_max_position_embeddings(self) -> int:
        return int(self.params.get("original_max_position_embeddings") or self.max_position_embeddings)


def _as_config(config_or_params):
    """A standardised private copy of a transformers config (or of a config.json-style dict)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_params, PretrainedConfig):
        config = copy.deepcopy(config_or_params)
    elif isinstance(config_or_params, dict):
        data = dict(config_or_params)
        data.setdefault("model_type", "llama")
        config = AutoConfig.for_model(**data)
    else:
        raise TypeError(f"rope_inv_freq needs a transformers config or a dict, got {type(config_or_params).__name__}")
    config.standardize_rope_params()  # legacy rope_scaling / rope_theta → rope_parameters
    return config


def _is_per_layer_type(params: dict) -> bool:
    return bool(params) and all(isinstance(v, dict) or v is None for v in params.values())


def rope_layer_types(config_or_params) -> list[str] | None:
    """The layer types with their own RoPE parameters (Gemma 3: sliding_attention and
    full_attention), or None when every layer shares one set."""
    params = _as_config(config_or_params).rope_parameters or {}
    return sorted(k for k, v in params.items() if v is not None) if _is_per_layer_type(params) else None


def rope_spec(config_or_params, layer_type: str | None = None) -> RopeSpec:
    """Normalise a transformers config, a config.json-style dict, or a dict with ``rope_parameters``
    / legacy ``rope_scaling`` (+ ``rope_theta``, ``head_dim`` or ``hidden_size``/``num_attention_heads``).
    Configs with per-layer-type parameters need ``layer_type``."""
    config = _as_config(config_or_params)
    params = dict(config.rope_parameters or {})
    if _is_per_layer_type(params):
        types = sorted(k for k, v in params.items() if v is not None)
        if layer_type not in types:
            raise ValueError(f"this config has RoPE parameters per layer type {types}; pass layer_type= one of them"
                             + ("" if layer_type is None else f" (got {layer_type!r})"))
        params = dict(params[layer_type])
    elif layer_type is not None:
        raise ValueError(f"layer_type={layer_type!r} given, but this config has one set of RoPE parameters for "
                         "every layer; leave layer_type out")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    dim = int(head_dim * partial)
    return RopeSpec(rope_type, float(params["rope_theta"]), dim, head_dim, int(config.max_position_embeddings), params)


def _theta(spec: RopeSpec, base: float | None = None) -> torch.Tensor:
    # transformers' order: 1 / (b ** (arange(0, d, 2) / d)), fp32 throughout
    exponents = torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim
    return 1.0 / ((spec.theta if base is None else base) ** exponents)


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    p, d, b = spec.params, spec.dim, spec.theta
    L0 = spec.original_max_position_embeddings
    s = p.get("factor") or spec.max_position_embeddings / L0

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = mscale(s, p["mscale"]) / mscale(s, p["mscale_all_dim"])
        else:
            attention = mscale(s)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in L0
        return (d * math.log(L0 / (rotations * 2 * math.pi))) / (2 * math.log(b))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # Same op order as transformers (bitwise equal in fp32): θ = 1/b^e and θ/s = 1/(s·b^e) are each
    # one rounding of the power, and the blend weights are 1 − (1 − γ) and (1 − γ).
    pos_freqs = b ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s * pos_freqs)
    keep = 1 - ramp  # ramp 0 (high frequencies): keep θ; ramp 1 (low frequencies): interpolate θ/s
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


def _llama3(spec: RopeSpec) -> torch.Tensor:
    p = spec.params
    s, low, high, L0 = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    theta = _theta(spec)
    wavelen = 2 * math.pi / theta
    out = torch.where(wavelen > L0 / low, theta / s, theta)
    sigma = (L0 / wavelen - low) / (high - low)
    blended = (1 - sigma) * out / s + sigma * out  # transformers' order (bitwise equal)
    medium = ~(wavelen < L0 / high) & ~(wavelen > L0 / low)
    return torch.where(medium, blended, out)


def _longrope(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    p = spec.params
    L0 = spec.original_max_position_embeddings
    s = p.get("factor") or spec.max_position_embeddings / L0
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(L0))
    ext = torch.tensor(p["long_factor"] if seq_len and seq_len > L0 else p["short_factor"], dtype=torch.float32)
    if ext.numel() != spec.dim // 2:
        raise ValueError(f"longrope factors need {spec.dim // 2} entries (rotary dim / 2), got {ext.numel()}")
    exponents = torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim
    return 1.0 / (ext * spec.theta ** exponents), float(attention)  # transformers' order: 1/(ext·b^e)


def inv_freq_and_factor(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 (dim/2,), attention factor) for a sequence of ``seq_len`` tokens (None: the
    model's default length)."""
    t, p = spec.rope_type, spec.params
    if t == "default":
        return _theta(spec), 1.0
    if t == "linear":
        return _theta(spec) / p["factor"], 1.0
    if t == "dynamic":
        s, max_pos = p["factor"], spec.max_position_embeddings
        length = max(seq_len or max_pos, max_pos)
        base = spec.theta * ((s * length / max_pos) - (s - 1)) ** (spec.dim / (spec.dim - 2))
        return _theta(spec, base), 1.0
    if t == "yarn":
        return _yarn(spec)
    if t == "llama3":
        return _llama3(spec), 1.0
    return _longrope(spec, seq_len)


def rope_inv_freq(config_or_params, seq_len: int | None = None, device=None,
                  layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, rotary_dim/2) and attention factor for a model config or RoPE
    parameter dict, at sequence length ``seq_len`` (matters for dynamic NTK and LongRoPE), for
    ``layer_type`` when the config has parameters per layer type (see :func:`rope_layer_types`)."""
    inv_freq, factor = inv_freq_and_factor(rope_spec(config_or_params, layer_type), seq_len)
    return inv_freq.to(device) if device is not None else inv_freq, factor
