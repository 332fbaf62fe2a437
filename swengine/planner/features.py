"""Features of a (model, setup) pair that activation memory is linear in.

Every activation a decoder layer keeps for backward is a (tokens × width) tensor whose width
is one of the model's dimensions, so the bytes of a phase's peak, minus the exact static part,
are a linear form in tokens × {hidden, intermediate, q/kv width, heads, LoRA rank·targets,
vocab}, per layer and once (LM head and loss, one recomputed layer under checkpointing), plus
tokens × seq × heads for eager attention's probabilities and a few terms in the number of
trainable parameters (their gradients and autocast's bf16 copies).
"""

from __future__ import annotations

from swengine.planner.inventory import Inventory
from swengine.planner.setup import Setup
from swengine.planner.static import lora_targets

WIDTHS = ("1", "h", "i", "kv", "q", "nh", "R")
FEATURES = (
    *(f"T*{w}" for w in WIDTHS), "T*V", "s*hd",
    *(f"LT*{w}" for w in WIDTHS),
    "T*s", "T*s*nh", "LT*s*nh",
    "P", "P1", "1",
)


def features(inv: Inventory, setup: Setup, lora_numel: int, lora_numel_per_layer: int) -> dict[str, float]:
    T, s, L = setup.tokens, setup.seq_len, inv.num_layers
    widths = {"1": 1, "h": inv.hidden, "i": inv.intermediate, "kv": inv.kv_dim, "q": inv.q_dim, "nh": inv.heads,
              "R": setup.lora_rank * len(lora_targets(inv, setup))}
    f = {f"T*{w}": T * v for w, v in widths.items()}
    f.update({f"LT*{w}": L * T * v for w, v in widths.items()})
    f["T*V"] = T * inv.vocab
    f["s*hd"] = s * inv.head_dim
    f["T*s"] = T * s  # eager attention's (batch, 1, seq, seq) mask
    f["T*s*nh"] = T * s * inv.heads
    f["LT*s*nh"] = L * T * s * inv.heads
    f["P"] = lora_numel
    f["P1"] = lora_numel_per_layer
    f["1"] = 1
    return f
