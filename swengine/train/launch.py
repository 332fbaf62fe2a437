"""`swengine train --nproc N`: start the same command under torchrun, N processes on this machine.

The command line is passed on unchanged except ``--nproc``; torchrun's exit status is ours (0 when
every rank finished, non-zero when any failed; each rank's own line on stderr says why)."""

from __future__ import annotations

import signal
import subprocess
import sys

from swengine.errors import UserError
from swengine.train.distributed import launched


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` with every ``--nproc N`` / ``--nproc=N`` taken out."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "swengine", *without_nproc(argv)]


def launch(nproc: int, argv: list[str]) -> None:
    """Run ``swengine ARGV`` (``train ...``) under torchrun and exit with its status. SIGINT and
    SIGTERM are passed to torchrun, which passes them to the ranks (they save and stop); we wait."""
    if launched():
        raise UserError("--nproc inside torchrun: torchrun already started the ranks; drop --nproc")
    proc = subprocess.Popen(torchrun_command(nproc, argv))
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code and forwarded:  # torchrun ends with 1 after a signal; the ranks saved and stopped for it
        code = 128 + forwarded[0]
    sys.exit(code if code >= 0 else 128 - code)  # killed by a signal: the shell's 128 + signum
