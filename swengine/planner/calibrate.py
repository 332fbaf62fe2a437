"""Calibrate the analytic model's activation coefficients with the measuring harness.

For one profile (model family, LoRA implementation, attention, loss, checkpointing) we measure
the per-phase peaks of many small random models of that family in fake-tensor mode (exact and
cheap: fake tensors have no storage), subtract the exact static bytes, and solve the linear
system in :mod:`swengine.planner.features` by least squares. Coefficients are stored in
``calibration.json`` beside this file; tests and ``bench/`` then check the analytic model
against fresh measurements of full-size models it has never seen.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from swengine.model.presets import PRESETS
from swengine.planner.features import FEATURES, features
from swengine.planner.inventory import inventory
from swengine.planner.setup import Setup
from swengine.planner.static import static_bytes

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
PHASES = ("forward:attn", "forward:mlp", "forward:head", "head_backward", "layers_backward:recompute_attn",
          "layers_backward:recompute_mlp", "layers_backward:mlp", "layers_backward:attn", "optimizer")
FAMILY_PRESET = {"llama": "llama-3.2-1b", "mistral": "mistral-7b", "qwen2": "qwen2.5-0.5b", "phi3": "phi-3-mini",
                 "gemma2": "gemma-2-2b"}


def profile_key(family: str, setup: Setup) -> str:
    attention = "eager" if family == "gemma2" else setup.attention  # soft-capped attention runs eager
    return f"{family}|{setup.lora_impl}|{attention}|{setup.loss}|{'ckpt' if setup.checkpointing else 'nockpt'}"


def _random_config(family: str, rng: random.Random):
    from transformers import AutoConfig

    base = dict(PRESETS[FAMILY_PRESET[family]])
    # Full-size widths: fake tensors cost nothing, and at real sizes the allocator's 512 B
    # rounding (which would dominate tiny tensors) is negligible, as it is for real models.
    L = rng.choice([1, 2, 3])
    nh = rng.choice([8, 12, 16, 24, 32])
    nkv = rng.choice([d for d in (1, 2, 4, 8, 16, 32) if nh % d == 0])
    hd = rng.choice([64, 96, 128])
    if family == "phi3":  # head_dim is hidden / heads there
        h = nh * hd
    else:
        h = nh * 32 * rng.randint(2, 8)  # configs insist hidden % heads == 0; q = heads·head_dim may differ
        base["head_dim"] = hd
    i = 64 * round(h * rng.uniform(2.5, 5.5) / 64)
    base.update(num_hidden_layers=L, hidden_size=h, intermediate_size=i, num_attention_heads=nh,
                num_key_value_heads=nkv, vocab_size=rng.randint(33_000, 160_000))  # above Phi-3's pad id 32000
    if family == "gemma2":
        base["query_pre_attn_scalar"] = hd
    return AutoConfig.for_model(**base)


def _random_setup(template: Setup, rng: random.Random) -> Setup:
    return template.with_(seq_len=rng.randint(256, 4096), micro_batch=rng.choice([1, 2, 4]),
                          lora_rank=rng.choice([4, 8, 16, 32, 64, 128]))


def sample(family: str, template: Setup, n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Measure ``n`` random small models: the feature matrix and, per phase, the bytes above static."""
    from swengine.planner.measure import measure_fake

    rng = random.Random(seed)
    rows, ys = [], {p: [] for p in PHASES}
    for _ in range(n):
        config, setup = _random_config(family, rng), _random_setup(template, rng)
        inv = inventory(config)
        st = static_bytes(inv, setup)
        m = measure_fake(config, setup)
        f = features(inv, setup, st.lora_numel, st.lora_numel_per_layer)
        rows.append([f[k] for k in FEATURES])
        for p in PHASES:  # phases a setup never enters (no recompute without checkpointing) count as 0
            ys[p].append(m.phase_peaks.get(p, st.total) - st.total)
    return np.array(rows, dtype=np.float64), {p: np.array(v, dtype=np.float64) for p, v in ys.items()}


def fit(X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    # minimise relative error (rows divided by y): small and large setups count alike; scale
    # columns so tiny and huge features are conditioned alike; drop all-zero columns
    w = 1.0 / np.maximum(np.abs(y), 2**20)
    scale = np.abs(X * w[:, None]).max(axis=0)
    keep = scale > 0
    coef = np.zeros(X.shape[1])
    sol, *_ = np.linalg.lstsq(X[:, keep] * w[:, None] / scale[keep], y * w, rcond=None)
    coef[keep] = sol / scale[keep]
    return {k: float(c) for k, c in zip(FEATURES, coef, strict=True) if abs(c) > 1e-9}


def calibrate(family: str, template: Setup, n: int = 48, seed: int = 0) -> dict:
    X, ys = sample(family, template, n, seed)
    Xv, yv = sample(family, template, max(8, n // 4), seed + 1)  # held out
    result = {"samples": n, "phases": {}}
    for p in PHASES:
        coef = fit(X, ys[p])
        pred = Xv @ np.array([coef.get(k, 0.0) for k in FEATURES])
        err = np.abs(pred - yv[p]) / np.maximum(yv[p], 1)
        result["phases"][p] = coef
        result.setdefault("holdout_max_rel_error", {})[p] = float(err.max())
    return result


def load_calibration() -> dict:
    if not CALIBRATION_FILE.exists():
        return {}
    return json.loads(CALIBRATION_FILE.read_text())


def save_calibration(data: dict) -> None:
    CALIBRATION_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
