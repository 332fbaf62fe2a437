#!/usr/bin/env python
"""Re-derive the planner's activation coefficients (swengine/planner/calibration.json) from
fake-tensor measurements of random models of every supported family and setup profile.

    python tools/calibrate_planner.py [--family llama] [--samples 40]

Takes about a minute per profile on a laptop CPU. Run it after changing the training step,
the model patching or a kernel's saved tensors, then commit calibration.json.
"""

import argparse
import itertools
import sys
import time

from swengine.planner.calibrate import (
    FAMILY_PRESET,
    calibrate,
    load_calibration,
    profile_key,
    save_calibration,
)
from swengine.planner.setup import Setup


def profiles(families, impls, losses, attentions):
    for family, impl, attention, loss, ckpt in itertools.product(families, impls, attentions, losses,
                                                                 (True, False)):
        if family == "gemma2" and attention == "sdpa":
            continue  # soft-capped attention always runs eager
        yield family, Setup(seq_len=1, lora_impl=impl, attention=attention, loss=loss, checkpointing=ckpt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", choices=sorted(FAMILY_PRESET))
    ap.add_argument("--impl", action="append", choices=["peft", "swkernels"])
    ap.add_argument("--loss", action="append", choices=["unfused", "fused"])
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--attention", action="append", choices=["sdpa", "eager"])
    args = ap.parse_args(argv)
    data = load_calibration()
    for family, template in profiles(args.family or sorted(FAMILY_PRESET), args.impl or ["peft"],
                                      args.loss or ["unfused"], args.attention or ["sdpa", "eager"]):
        key = profile_key(family, template)
        start = time.time()
        # eager attention adds seq² terms whose peak moment moves: more samples pin them down
        n = args.samples * (2 if template.attention == "eager" or family == "gemma2" else 1)
        data[key] = calibrate(family, template, n=n)
        save_calibration(data)  # after each profile: an interrupted run keeps what it finished
        errs = ", ".join(f"{p} {100 * e:.2f}%" for p, e in data[key]["holdout_max_rel_error"].items())
        print(f"{key}: {time.time() - start:.0f}s, held-out max error {errs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
