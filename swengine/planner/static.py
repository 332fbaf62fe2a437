"""Exact bytes of what lives through the whole step: base weights (bf16/fp16 or NF4), LoRA
adapters (fp32) and optimizer states. Every tensor rounded to 512 B as the allocator does.

Per rank under FSDP2 (``setup.shard_world`` = N > 1): the decoder layers' weights, the adapter and
its optimizer states are 1/N each, plus two whole layers of weights (the one being computed, all-
gathered, and the next one, prefetched); embeddings, norms and the LM head are counted whole (the
head is not sharded)."""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from swengine.planner.inventory import (
    BNB_8BIT_BLOCK,
    BNB_8BIT_MIN_NUMEL,
    NESTED_BLOCK,
    NF4_BLOCK,
    Inventory,
    Linear,
    _r,
)
from swengine.planner.setup import Setup


def lora_targets(inv: Inventory, setup: Setup) -> tuple[Linear, ...]:
    """The linears of one layer that get adapters ("all-linear" = every projection in the layer)."""
    if setup.lora_targets == ("all-linear",):
        return inv.layer_linears
    return tuple(li for li in inv.layer_linears if li.name in setup.lora_targets)


def nf4_weight_bytes(numel: int, double_quant: bool) -> int:
    """bitsandbytes NF4: two 4-bit codes per byte, one absmax per 64 values (fp32, or uint8 plus
    one fp32 per 256 blocks with double quant), the 16-entry code and, for dq, the mean offset."""
    blocks = ceil(numel / NF4_BLOCK)
    packed = _r(numel // 2 + numel % 2)
    code = _r(16 * 4)
    if not double_quant:
        return packed + _r(4 * blocks) + code
    nested_code = _r(256 * 4)  # the 8-bit dynamic map of the nested quantisation, one per weight
    return packed + _r(blocks) + _r(4 * ceil(blocks / NESTED_BLOCK)) + code + nested_code + _r(4)


@dataclass(frozen=True)
class StaticBytes:
    base_weights: int
    lora_params: int
    optimizer_states: int
    lora_numel: int  # trainable parameter count
    lora_numel_per_layer: int

    @property
    def total(self) -> int:
        return self.base_weights + self.lora_params + self.optimizer_states


def _optimizer_bytes(numels: list[int], optimizer: str) -> int:
    if optimizer == "adamw":  # exp_avg + exp_avg_sq (fp32) + a step tensor (fused AdamW)
        return sum(2 * _r(4 * n) + _r(4) for n in numels)
    total = 0
    for n in numels:  # bitsandbytes 8-bit: uint8 states + fp32 absmax per 256 values
        if n >= BNB_8BIT_MIN_NUMEL:
            total += 2 * _r(n) + 2 * _r(4 * ceil(n / BNB_8BIT_BLOCK))
        else:
            total += 2 * _r(4 * n)
    return total


def static_bytes(inv: Inventory, setup: Setup) -> StaticBytes:
    targets = lora_targets(inv, setup)
    target_names = {t.name for t in targets}
    quant = setup.quant != "none"
    layer = 0
    for li in inv.layer_linears:
        n = li.in_features * li.out_features
        layer += nf4_weight_bytes(n, setup.quant == "nf4-dq") if quant and li.name in target_names else _r(2 * n)
    # biases, norms, embeddings and the LM head are all in other_params
    w = setup.shard_world
    layers = inv.num_layers * layer if w == 1 else ceil(inv.num_layers * layer / w) + 2 * layer
    base = layers + sum(_r(2 * n) for n in inv.other_params) + inv.buffer_bytes
    r = setup.lora_rank
    lora_numels = [n for li in targets for n in (r * li.in_features, li.out_features * r)]
    lora = ceil(inv.num_layers * sum(_r(4 * n) for n in lora_numels) / w)
    opt = ceil(inv.num_layers * _optimizer_bytes(lora_numels, setup.optimizer) / w)
    return StaticBytes(base, lora, opt, inv.num_layers * sum(lora_numels), sum(lora_numels))
