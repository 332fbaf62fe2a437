"""RotaryEmbedding: a drop-in replacement for a transformers rotary module (LlamaRotaryEmbedding
and its siblings) computing inverse frequencies with :mod:`swkernels.rope_scaling`.

It returns ``(cos, sin)`` with the shapes and dtype transformers' attention expects, so an
unmodified model keeps working after :func:`replace_rotary`; ``inv_freq_for(seq_len)`` and
``attention_factor`` feed the fused :func:`swkernels.apply_rope` kernel (``inv_freq`` itself stays
the length-independent table, as built at init).

Dynamic NTK is a pure function of the current sequence length here: it grows when the sequence
grows past ``max_position_embeddings`` and is exactly the original below it. (transformers keeps
the frequencies of the longest sequence seen until a sequence shorter than the original length
arrives, so a 5K-token batch after a 9K one is rotated with the 9K frequencies.)
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from swkernels.reference.rope import rope_cos_sin
from swkernels.rope_scaling import RopeSpec, inv_freq_and_factor, rope_layer_types, rope_spec

log = logging.getLogger("swkernels")

_LENGTH_DEPENDENT = ("dynamic", "longrope")


class RopeArgs(NamedTuple):
    """What a fused attention module needs to rotate q and k in one :func:`swkernels.apply_rope`
    launch: returned by :class:`RotaryEmbedding` in place of (cos, sin) tables once ``fused`` is
    set, so no (seq × dim) table is built. Three fields, so an unpatched attention that unpacks
    ``cos, sin = position_embeddings`` fails loudly instead of rotating wrongly."""

    position_ids: torch.Tensor
    inv_freq: torch.Tensor
    attention_factor: float


class RotaryEmbedding(nn.Module):
    """cos/sin for transformers' attention from any supported RoPE scaling.

    Buffers and attributes follow transformers' names: ``inv_freq``, ``original_inv_freq``,
    ``attention_scaling``, ``rope_type`` — or, for configs with parameters per layer type
    (Gemma 3), ``{layer_type}_inv_freq`` etc. with ``rope_type`` a dict, and ``forward`` taking
    the layer type as transformers' per-layer-type modules do.
    """

    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        self.layer_types = rope_layer_types(config)
        self.specs: dict[str | None, RopeSpec] = {lt: rope_spec(config, lt) for lt in self.layer_types or [None]}
        self.rope_type = ({lt: spec.rope_type for lt, spec in self.specs.items()} if self.layer_types
                          else self.specs[None].rope_type)
        for layer_type, spec in self.specs.items():
            prefix = _prefix(layer_type)
            inv_freq, factor = inv_freq_and_factor(spec)
            self.register_buffer(f"{prefix}inv_freq", inv_freq.to(device), persistent=False)
            self.register_buffer(f"{prefix}original_inv_freq", inv_freq.clone().to(device), persistent=False)
            setattr(self, f"{prefix}attention_scaling", factor)
        self.max_seq_len_cached = self.original_max_seq_len = int(config.max_position_embeddings)
        self.fused = False  # set by swengine's patch once every attention module rotates with apply_rope
        self._by_length: dict[tuple[str | None, int], tuple[torch.Tensor, float]] = {}

    @property
    def spec(self) -> RopeSpec:
        """The RoPE parameters (for configs with one set for every layer)."""
        return self._spec(None)

    @property
    def attention_factor(self) -> float | dict[str, float]:
        """The cos/sin scale (YaRN, LongRoPE; 1 otherwise) to pass to :func:`swkernels.apply_rope`
        (a dict per layer type for per-layer-type configs). ``attention_scaling`` is the same number
        under transformers' name."""
        if self.layer_types:
            return {lt: getattr(self, f"{_prefix(lt)}attention_scaling") for lt in self.layer_types}
        return self.attention_scaling

    def _spec(self, layer_type: str | None) -> RopeSpec:
        if layer_type not in self.specs:
            raise ValueError(f"layer_type must be one of {list(self.specs)} for this config, got {layer_type!r}")
        return self.specs[layer_type]

    def inv_freq_for(self, seq_len: int | None, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq on this module's device, attention factor) for a sequence of ``seq_len`` tokens
        (the largest position + 1): what :func:`swkernels.apply_rope` needs."""
        spec, prefix = self._spec(layer_type), _prefix(layer_type)
        table, factor = getattr(self, f"{prefix}inv_freq"), getattr(self, f"{prefix}attention_scaling")
        if spec.rope_type not in _LENGTH_DEPENDENT or seq_len is None:
            return table, factor
        if spec.rope_type == "dynamic" and seq_len <= spec.max_position_embeddings:
            return getattr(self, f"{prefix}original_inv_freq"), factor  # the original frequencies, exactly
        if spec.rope_type == "longrope":  # only two sets exist: short (≤ L0) and long
            L0 = spec.original_max_position_embeddings
            seq_len = L0 + (seq_len > L0)
        key = (layer_type, seq_len)
        cached = self._by_length.get(key)
        if cached is None or cached[0].device != table.device:  # new length, or the module moved
            if len(self._by_length) > 16:
                self._by_length.clear()
            inv, length_factor = inv_freq_and_factor(spec, seq_len)
            cached = self._by_length[key] = (inv.to(table.device), length_factor)
        return cached

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        """(cos, sin), each (B, T, rotary_dim) in x's dtype, times the attention factor; or, with
        ``fused`` set, :class:`RopeArgs` for the in-kernel rotation (no tables)."""
        spec = self._spec(layer_type)
        seq_len = int(position_ids.max()) + 1 if spec.rope_type in _LENGTH_DEPENDENT else None
        inv_freq, factor = self.inv_freq_for(seq_len, layer_type)
        if self.fused:
            return RopeArgs(position_ids, inv_freq, factor)
        cos, sin = rope_cos_sin(position_ids, inv_freq.to(x.device), factor)
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{lt + ': ' if lt else ''}rope_type={s.rope_type}, dim={s.dim}, theta={s.theta}"
                         for lt, s in self.specs.items())


def _prefix(layer_type: str | None) -> str:
    return f"{layer_type}_" if layer_type else ""


def _inv_freq_buffer(module: nn.Module) -> torch.Tensor | None:
    return next((b for n, b in module.named_buffers(recurse=False) if n.endswith("inv_freq")), None)


def _is_rotary(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding") and not isinstance(module, RotaryEmbedding) \
        and _inv_freq_buffer(module) is not None


def _is_fake(t: torch.Tensor) -> bool:
    """Meta or fake tensors (model construction for memory planning): nothing to probe."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type == "meta" or isinstance(t, FakeTensor)


def _agrees(theirs: nn.Module, ours: RotaryEmbedding, device: torch.device) -> bool:
    """Does ours return theirs' cos/sin on a short probe? Catches rotary modules with other
    semantics (e.g. multimodal 3-D positions) that share the name."""
    x = torch.zeros(1, 16, 1, device=device)
    pos = torch.arange(16, device=device)[None]
    try:
        theirs_types = getattr(theirs, "rope_type", None)
        for layer_type in ours.layer_types or [None]:
            if isinstance(theirs_types, dict) and layer_type not in theirs_types:
                continue  # transformers builds only the layer types the model has
            args = (x, pos) if layer_type is None else (x, pos, layer_type)
            for a, b in zip(ours(*args), theirs(*args), strict=True):
                if a.shape != b.shape or not torch.allclose(a, b, atol=1e-6, rtol=1e-5):
                    return False
    except Exception:  # a module whose forward takes other arguments is not ours to replace
        return False
    return True


def replace_rotary(model: nn.Module, swapped: list | None = None) -> int:
    """Swap every transformers rotary module in ``model`` for a :class:`RotaryEmbedding` built
    from the same config (a module swap; nothing in transformers is reassigned). A module whose
    config we cannot read (an unsupported rope_type) or whose outputs differ from ours on a short
    probe (another convention under the same name) is kept, with a warning. Returns how many
    were replaced. ``swapped`` (optional) collects (parent, name, original) to undo the swap."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_rotary(child):
                continue
            device = _inv_freq_buffer(child).device
            try:
                ours = RotaryEmbedding(child.config, device=device)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                log.warning("kept %s.%s (%s): %s", type(parent).__name__, name, type(child).__name__, exc)
                continue
            if not _is_fake(_inv_freq_buffer(child)) and not _agrees(child, ours, device):
                log.warning("kept %s.%s (%s): its cos/sin differ from ours", type(parent).__name__, name,
                            type(child).__name__)
                continue
            setattr(parent, name, ours)
            if swapped is not None:
                swapped.append((parent, name, child))
            replaced += 1
    return replaced
