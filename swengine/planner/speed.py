"""The planner's speed model: seconds per optimizer step of a setup, fitted to measured steps.

One micro-batch costs a linear form in five features, and the optimizer update one more:

    step = accumulation · (c_flops·FLOPs + c_weights·weight elements read + c_nf4·NF4 elements
                           dequantised + c_calls·layer passes + c_batch) + c_params·trainable parameters

- FLOPs: the frozen base's forward and input-gradient backward (2N + 2N per token), the
  recompute under checkpointing (+2N), attention, and the adapters' three small matmuls;
- weight elements read: every base weight (and the LM head) is read once per pass over it
  (forward, backward, and the recompute), whatever the micro-batch: what makes a small
  micro-batch memory-bound;
- NF4 elements: every quantised weight is also dequantised once per pass: the extra cost QLoRA
  pays per micro-batch whatever its size;
- layer passes: decoder layers run forward, backward (and recompute): per-kernel launch and
  Python overhead, what makes small micro-batches inefficient;
- one per micro-batch (embedding, loss, the loop) and, per step, the optimizer over the adapters.

The coefficients are per device and LoRA implementation. Measured tables live in ``speed.json``
beside this file (``tools/calibrate_speed.py`` measures real steps on the machine it runs on and
refits; CPU now, a GPU architecture whenever a GPU run happens). A GPU with no measured table of
its architecture gets coefficients derived from its published TFLOP/s and bandwidth, and the
plan says so.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PretrainedConfig

from swengine.planner.inventory import inventory
from swengine.planner.setup import Setup
from swengine.planner.static import lora_targets, static_bytes

SPEED_FILE = Path(__file__).with_name("speed.json")
FEATURES = ("flops", "weights", "nf4", "calls", "batch", "params")
GENERIC_MFU = 0.45  # dense bf16 LoRA training on consumer cards, before measurements say otherwise


def flops_per_token(config: PretrainedConfig, setup: Setup) -> float:
    """Training FLOPs per token: frozen base forward (2N) + input-gradient backward (2N), +2N
    recompute under checkpointing; attention 12·L·q·s per token forward+backward for a causal
    mask (×1.5 with recompute); each adapter's A and B matmuls forward, dX and dA/dB (6·r·(in+out))."""
    inv = inventory(config)
    n = inv.num_layers * sum(li.in_features * li.out_features for li in inv.layer_linears)
    n += inv.vocab * inv.hidden  # LM head
    dense = (6 if setup.checkpointing else 4) * n
    attn = 6 * inv.num_layers * inv.q_dim * setup.seq_len * (1.5 if setup.checkpointing else 1.0)
    lora = inv.num_layers * sum(6 * setup.lora_rank * (li.in_features + li.out_features)
                                for li in lora_targets(inv, setup))
    return dense + attn + lora * (4 / 3 if setup.checkpointing else 1.0)


def features(config: PretrainedConfig, setup: Setup, grad_accumulation: int = 1) -> dict[str, float]:
    """The speed model's features of one optimizer step."""
    inv = inventory(config)
    passes = 3 if setup.checkpointing else 2
    quantised = sum(li.in_features * li.out_features for li in lora_targets(inv, setup)) * inv.num_layers
    layers = sum(li.in_features * li.out_features for li in inv.layer_linears) * inv.num_layers
    micro = {
        "flops": flops_per_token(config, setup) * setup.tokens,
        "weights": layers * passes + inv.vocab * inv.hidden * 2,  # the LM head: forward and backward
        "nf4": quantised * passes if setup.quant != "none" else 0.0,
        "calls": inv.num_layers * passes,
        "batch": 1.0,
    }
    f = {k: v * grad_accumulation for k, v in micro.items()}
    f["params"] = float(static_bytes(inv, setup).lora_numel)
    return f


@dataclass(frozen=True)
class SpeedModel:
    """Seconds per optimizer step = Σ coef·feature; ``source`` says where the coefficients come from."""

    coef: dict[str, float]
    source: str
    measured: bool

    def step_seconds(self, config: PretrainedConfig, setup: Setup, grad_accumulation: int = 1) -> float:
        f = features(config, setup, grad_accumulation)
        return sum(self.coef.get(k, 0.0) * f[k] for k in FEATURES)

    def tokens_per_second(self, config: PretrainedConfig, setup: Setup, grad_accumulation: int = 1) -> float:
        return setup.tokens * grad_accumulation / self.step_seconds(config, setup, grad_accumulation)


def fit(rows: list[dict[str, float]], seconds: list[float]) -> dict[str, float]:
    """Non-negative least squares on relative error (every measured step counts alike): the best
    of the exact least-squares fits over feature subsets whose coefficients are all >= 0 (five
    features: 63 subsets, each a tiny solve)."""
    X = np.array([[r[k] for k in FEATURES] for r in rows], dtype=np.float64)
    y = np.array(seconds, dtype=np.float64)
    Xw = X / y[:, None]
    scale = np.abs(Xw).max(axis=0)
    usable = [j for j in range(len(FEATURES)) if scale[j] > 0]
    best, best_err = None, math.inf
    for k in range(1, len(usable) + 1):
        for subset in itertools.combinations(usable, k):
            cols = list(subset)
            sol, *_ = np.linalg.lstsq(Xw[:, cols] / scale[cols], np.ones(len(y)), rcond=None)
            if (sol < 0).any():
                continue
            coef = np.zeros(len(FEATURES))
            coef[cols] = sol / scale[cols]
            err = float(np.square(Xw @ coef - 1).sum())
            if err < best_err:
                best, best_err = coef, err
    if best is None:
        raise ValueError("no non-negative fit: the measured step times do not grow with any feature")
    return {k: float(c) for k, c in zip(FEATURES, best, strict=True) if c > 0}


def load_tables() -> dict:
    return json.loads(SPEED_FILE.read_text()) if SPEED_FILE.exists() else {}


def device_key(capability: str | None) -> str:
    """A speed table's key: "cpu", or the GPU architecture, e.g. "sm_89"."""
    return f"sm_{capability.replace('.', '')}" if capability else "cpu"


def generic(profile, lora_impl: str) -> SpeedModel:
    """Coefficients from a GPU's published figures: FLOPs at GENERIC_MFU of the tensor peak; each
    weight read as 2 B of bandwidth (bf16); dequantisation as extra memory traffic (the fused NF4
    kernel decodes in registers, ~1.5 B/element of bandwidth-equivalent work; PEFT + bitsandbytes
    writes a bf16 copy and the GEMM reads it back: ~4 B); ~15 kernel launches of ~8 µs per layer
    pass; 28 B of optimizer traffic per trainable parameter (fp32 weight, grad and two states)."""
    tflops = (profile.tensor_tflops if profile else 100.0) * 1e12
    bandwidth = (profile.mem_gbps if profile else 900.0) * 1e9
    coef = {"flops": 1 / (tflops * GENERIC_MFU), "weights": 2.0 / bandwidth,
            "nf4": (1.5 if lora_impl == "swkernels" else 4.0) / bandwidth,
            "calls": 15 * 8e-6, "batch": 2e-3, "params": 28 / bandwidth}
    name = profile.name if profile else "an unknown GPU"
    return SpeedModel(coef, f"generic: {name}'s published TFLOP/s and bandwidth (no measured steps on "
                            "this architecture yet)", measured=False)


def model_for(profile, lora_impl: str, tables: dict | None = None) -> SpeedModel:
    """The speed model for planning on a GPU: the measured table of its architecture (scaled from
    the GPU it was measured on by tensor TFLOP/s and bandwidth), else generic coefficients from its
    published figures (``profile`` None: an unknown GPU, generic figures)."""
    from swengine.hardware import profile_for

    if profile is None:
        return generic(None, lora_impl)
    tables = load_tables() if tables is None else tables
    entry = tables.get(device_key(profile.capability), {}).get(lora_impl)
    if entry is None:
        return generic(profile, lora_impl)
    coef = dict(entry["coef"])
    ref = profile_for(entry.get("device", ""))
    if ref is not None and ref.key != profile.key:
        compute, memory = ref.tensor_tflops / profile.tensor_tflops, ref.mem_gbps / profile.mem_gbps
        coef = {k: v * (compute if k == "flops" else memory if k in ("weights", "nf4", "params") else 1.0)
                for k, v in coef.items()}
    return _measured(entry, coef)


def cpu_model(lora_impl: str = "swkernels", tables: dict | None = None) -> SpeedModel:
    """The measured CPU table (what the CPU-side tests and tools fit and check)."""
    tables = load_tables() if tables is None else tables
    entry = tables.get("cpu", {}).get(lora_impl)
    if entry is None:
        raise ValueError(f"no measured CPU speed table for lora_impl={lora_impl}; run tools/calibrate_speed.py")
    return _measured(entry, dict(entry["coef"]))


def _measured(entry: dict, coef: dict[str, float]) -> SpeedModel:
    return SpeedModel(coef, f"measured on {entry.get('device', '?')} ({entry.get('date', '?')}, "
                            f"{len(entry.get('samples', []))} steps)", measured=True)


# ---------------------------------------------------------------- measuring real steps

def measure_step_seconds(config: PretrainedConfig, setup: Setup, grad_accumulation: int = 1, *, steps: int = 5,
                         device: str = "cpu") -> float:
    """Wall time of a real optimizer step of the training step code on random weights (the fastest
    of ``steps`` after one warm-up step: other work on the machine only ever adds time), what the
    speed model is fitted to."""
    import torch

    import swkernels
    from swengine.planner.measure import DTYPES, build_training_model
    from swengine.train.optim import build_optimizer
    from swengine.train.step import forward_backward, optimizer_step

    model = build_training_model(config, setup, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw8bit" if setup.optimizer == "paged_adamw8bit" else setup.optimizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (setup.micro_batch, setup.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # on CPU the kernels' torch fallbacks run (the Triton interpreter would time Python, not math)
    backend = "torch" if device == "cpu" else None
    times = []
    with swkernels.force_backend(backend):
        for step in range(steps + 1):
            sync()
            start = time.perf_counter()
            for _ in range(grad_accumulation):
                forward_backward(model, batch, autocast_dtype=DTYPES[setup.dtype], fused_loss=setup.loss == "fused",
                                 num_items=setup.tokens * grad_accumulation)
            optimizer_step(optimizer, params, max_grad_norm=1.0)
            sync()
            if step:
                times.append(time.perf_counter() - start)
    return min(times)
