#!/usr/bin/env python
"""Roll a run back to the checkpoint that completed context-extension phase N (a thin wrapper over
``swengine rollback RUN --to phase-N``; see swengine/train/rollback.py).

    python tools/rollback.py --run-dir RUN --target-phase N
    python tools/rollback.py --run-dir RUN --to best|last-good|step-N
    python tools/rollback.py --run-dir RUN --list
"""

from __future__ import annotations

import argparse
import sys

from swengine.errors import UserError
from swengine.train import rollback as rb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="the output_dir of a `swengine train` run")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--target-phase", type=int, metavar="N", help="roll back to the end of phase N")
    what.add_argument("--to", help="phase-N, step-N, best or last-good")
    what.add_argument("--list", action="store_true", help="list the checkpoints and targets, change nothing")
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(rb.describe(*rb.listing(args.run_dir)))
            return 0
        to = f"phase-{args.target_phase}" if args.target_phase is not None else args.to
        result = rb.rollback(args.run_dir, to, log=lambda m: print(m, file=sys.stderr))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(rb.done_words(result.adapter.parent, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
