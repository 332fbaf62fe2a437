"""Measure real training steps on this machine and refit the planner's speed model.

    python tools/calibrate_speed.py                 # CPU: small random models, the torch fallbacks
    python tools/calibrate_speed.py --device cuda   # this GPU's architecture, full-size presets
    python tools/calibrate_speed.py --check         # print the fit's errors, write nothing
    python tools/calibrate_speed.py --refit         # recompute the stored steps' features and refit (no timing)

Every setup is timed as the loop runs it (swengine.train.step, fused loss), fitted by
non-negative least squares (swengine.planner.speed.fit), and the samples, coefficients and the
held-out error are written to swengine/planner/speed.json under the device key ("cpu", "sm_89",
...) and LoRA implementation. Every fourth step is held out of the fit that the error figures
come from; the stored coefficients are then fitted on all of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swengine.planner.setup import Setup  # noqa: E402
from swengine.planner.speed import (  # noqa: E402
    FEATURES,
    SPEED_FILE,
    device_key,
    features,
    fit,
    load_tables,
    measure_step_seconds,
)

DIMS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size")


def cpu_grid(rng: random.Random, n: int):
    """Small Llama-shaped models a 2-core CPU steps through in well under a second."""
    from transformers import LlamaConfig

    for _ in range(n):
        h = rng.choice([128, 192, 256, 384])
        config = LlamaConfig(hidden_size=h, intermediate_size=h * rng.choice([2, 3, 4]),
                             num_hidden_layers=rng.choice([1, 2, 3]), num_attention_heads=h // 64 * 2,
                             num_key_value_heads=h // 64, vocab_size=rng.choice([1024, 4096]))
        yield config, _setup(rng, seq=rng.choice([32, 64, 128, 256]), micro=rng.choice([1, 2, 4]))


def gpu_grid(rng: random.Random, n: int):
    from swengine.model.config import load_model_config

    models = ["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b"]
    for _ in range(n):
        config = load_model_config(rng.choice(models))
        yield config, _setup(rng, seq=rng.choice([512, 1024, 2048]), micro=rng.choice([1, 2, 4]))


def _setup(rng: random.Random, seq: int, micro: int) -> Setup:
    return Setup(seq_len=seq, micro_batch=micro, lora_rank=rng.choice([8, 16, 64]),
                 quant=rng.choice(["none", "nf4-dq"]), checkpointing=rng.choice([False, True]),
                 lora_impl="swkernels", loss="fused", optimizer="adamw")


def config_of(dims: dict):
    """The model config a stored step was measured on (its dimensions are all the features need)."""
    from transformers import AutoConfig

    dims = dict(dims)
    return AutoConfig.for_model(dims.pop("model_type"), **{k: v for k, v in dims.items() if v is not None})


def setup_of(sample: dict) -> Setup:
    s = dict(sample["setup"])
    s["lora_targets"] = tuple(s["lora_targets"])
    return Setup(**s)


def held_out_errors(samples: list[dict]) -> list[float]:
    """Relative errors on every fourth step, of a fit on the other three quarters."""
    coef = fit([s["features"] for i, s in enumerate(samples) if i % 4 != 3],
               [s["seconds"] for i, s in enumerate(samples) if i % 4 != 3])
    return sorted(abs(sum(coef.get(k, 0.0) * s["features"][k] for k in FEATURES) - s["seconds"]) / s["seconds"]
                  for s in samples[3::4])


def write(key: str, device_name: str, date: str, samples: list[dict]) -> None:
    errors = held_out_errors(samples)
    coef = fit([s["features"] for s in samples], [s["seconds"] for s in samples])
    print(f"coefficients: {coef}\nheld-out relative error: median {errors[len(errors) // 2]:.1%}, "
          f"max {errors[-1]:.1%} ({len(errors)} steps)")
    tables = load_tables()
    tables.setdefault(key, {})["swkernels"] = {
        "device": device_name, "date": date, "coef": coef, "holdout_median_rel_error": errors[len(errors) // 2],
        "holdout_max_rel_error": errors[-1], "samples": samples}
    SPEED_FILE.write_text(json.dumps(tables, indent=1, sort_keys=True) + "\n")
    print(f"wrote {SPEED_FILE} [{key}]")


def refit() -> int:
    for key, impls in load_tables().items():
        for entry in impls.values():
            for sample in entry["samples"]:
                sample["features"] = features(config_of(sample["model"]), setup_of(sample), sample["grad_accumulation"])
            write(key, entry["device"], entry["date"], entry["samples"])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=600, help="stop measuring after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="fit and report, do not write speed.json")
    ap.add_argument("--refit", action="store_true", help="recompute the stored steps' features and refit")
    args = ap.parse_args()
    if args.refit:
        return refit()
    import torch

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gpu = args.device.startswith("cuda")
    if gpu:
        cap = torch.cuda.get_device_capability()
        key, device_name = device_key(f"{cap[0]}.{cap[1]}"), torch.cuda.get_device_name()
    else:
        torch.set_num_threads(1)  # steadier timings on a shared machine
        key, device_name = "cpu", "cpu"
    grid = gpu_grid(rng, args.samples) if gpu else cpu_grid(rng, args.samples)
    samples, start = [], time.perf_counter()
    for config, setup in grid:
        if time.perf_counter() - start > args.seconds:
            break
        accum = rng.choice([1, 2])
        try:
            seconds = measure_step_seconds(config, setup, accum, device=args.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        samples.append({"features": features(config, setup, accum), "seconds": seconds, "setup": setup.to_dict(),
                        "grad_accumulation": accum, "model": {k: getattr(config, k, None) for k in DIMS}})
        print(f"{len(samples):3d} {seconds * 1e3:9.1f} ms  {setup.quant:6s} ckpt={setup.checkpointing!s:5s} "
              f"mb={setup.micro_batch} seq={setup.seq_len} accum={accum} h={config.hidden_size}", flush=True)
    if args.check:
        errors = held_out_errors(samples)
        print(f"held-out relative error: median {errors[len(errors) // 2]:.1%}, max {errors[-1]:.1%}")
        return 0
    write(key, device_name, datetime.date.today().isoformat(), samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
