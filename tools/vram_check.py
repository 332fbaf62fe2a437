#!/usr/bin/env python
"""Check the planner against real training steps on a big GPU that emulates small cards.

For every (card, model) pair: ``swengine plan`` picks a setup for the card; the model (random
weights, full size) is built with that setup, the process is capped at the card's VRAM with
``torch.cuda.set_per_process_memory_fraction``, and two real training steps run. Records the
planner's predicted peak, the measured ``max_memory_allocated`` and whether the steps ran out of
memory, one JSON line per pair.

    python tools/vram_check.py [--out results.jsonl] [--cards rtx-4060,rtx-4090] [--models qwen2.5-0.5b]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

CARDS = ("rtx-4060", "rtx-3060", "rtx-4060-ti-16g", "rtx-4090")  # 8, 12, 16, 24 GB
MODELS = ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")


def check(model: str, card: str, seq_len: int, batch: int) -> dict:
    import torch

    from swengine.model.config import load_model_config
    from swengine.planner.analytic import CUDA_CONTEXT_BYTES
    from swengine.planner.cli import make_plan
    from swengine.planner.measure import measure_cuda

    plan = make_plan(model, gpu=card, seq_len=seq_len, batch=batch)
    row = {"card": card, "model": model, "seq_len": seq_len, "fits": plan.fits, "vram_bytes": plan.vram_bytes}
    if not plan.fits:
        return row
    setup = plan.setup
    row.update(setup={k: v for k, v in setup.to_dict().items() if k != "teacher"},
               grad_accumulation=plan.grad_accumulation, predicted_peak_bytes=plan.estimate.peak_allocated,
               predicted_vram_needed_bytes=plan.estimate.total_vram)
    gc.collect()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    start = time.perf_counter()
    try:
        # the CUDA context (CUDA_CONTEXT_BYTES in the planner) lives outside the caching allocator
        m = measure_cuda(load_model_config(model), setup, cap_bytes=plan.vram_bytes - CUDA_CONTEXT_BYTES)
        row.update(oom=False, measured_peak_bytes=m.peak_bytes,
                   rel_error=(row["predicted_peak_bytes"] - m.peak_bytes) / m.peak_bytes)
    except torch.OutOfMemoryError as e:
        row.update(oom=True, error=str(e).splitlines()[0][:300])
    row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() - reserved
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="-")
    ap.add_argument("--cards", default=",".join(CARDS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("vram_check needs a CUDA GPU", file=sys.stderr)
        return 2
    out = sys.stdout if args.out == "-" else open(args.out, "a")
    bad = 0
    for card in args.cards.split(","):
        for model in args.models.split(","):
            try:
                row = check(model, card, args.seq_len, args.batch)
            except Exception as e:  # one broken pair must not hide the others' results
                row = {"card": card, "model": model, "exception": f"{type(e).__name__}: {e}"[:500]}
            bad += bool(row.get("oom") or row.get("exception"))
            print(json.dumps(row), file=out, flush=True)
            if out is not sys.stdout:
                g = 2**30
                print(f"{card:16s} {model:14s} fits={row.get('fits')} oom={row.get('oom')} "
                      f"pred={row.get('predicted_peak_bytes', 0) / g:.2f}G meas={row.get('measured_peak_bytes', 0) / g:.2f}G "
                      f"{row.get('setup', '')} {row.get('exception', '')}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
