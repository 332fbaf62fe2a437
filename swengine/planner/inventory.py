"""Exact parameter and optimizer-state bytes of a training setup, counted tensor by tensor.

The model is built once per config on the meta device (no memory, ~0.1 s) and its parameter
shapes are cached; every byte count after that is arithmetic. Each tensor is rounded up to the
CUDA caching allocator's 512 B, as the measuring harness counts them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

GRANULARITY = 512
NF4_BLOCK = 64
NESTED_BLOCK = 256  # double quant: one fp32 absmax per 256 first-level blocks
BNB_8BIT_BLOCK = 256  # blockwise 8-bit Adam
BNB_8BIT_MIN_NUMEL = 4096  # smaller tensors keep fp32 states


def _r(nbytes: int) -> int:
    return -(-nbytes // GRANULARITY) * GRANULARITY


@dataclass(frozen=True)
class Linear:
    name: str  # e.g. "q_proj"
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Inventory:
    """What a config's model holds: per-layer linears, other parameter shapes, dims."""

    family: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_linears: tuple[Linear, ...]  # of one decoder layer (all layers are alike)
    other_params: tuple[int, ...]  # numel of every other parameter (embeddings, norms, biases, head)
    buffer_bytes: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _config_key(config: PretrainedConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _inventory(key: str) -> Inventory:
    from transformers import AutoConfig

    data = json.loads(key)
    config = AutoConfig.for_model(**{k: v for k, v in data.items() if k != "transformers_version"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
                  and "DecoderLayer" in type(m[0]).__name__)
    linears = tuple(Linear(n.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
                    for n, m in layers[0].named_modules() if isinstance(m, nn.Linear))
    layer_linear_weights = {id(m.weight) for m in layers.modules() if isinstance(m, nn.Linear)}
    other = tuple(p.numel() for p in model.parameters() if id(p) not in layer_linear_weights)
    heads = config.num_attention_heads
    return Inventory(
        family=config.model_type, num_layers=config.num_hidden_layers, hidden=config.hidden_size,
        intermediate=config.intermediate_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size, layer_linears=linears, other_params=other,
        buffer_bytes=sum(_r(b.numel() * b.element_size()) for b in model.buffers()),
    )


def inventory(config: PretrainedConfig) -> Inventory:
    return _inventory(_config_key(config))
