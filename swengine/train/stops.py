"""How a run ends early without being bad input: stopped by a signal (exit 128+signum: 130 for
SIGINT, 143 for SIGTERM) or by a failure such as a full disk (exit 3). The CLI prints the message
as one line; the output_dir always keeps its last complete checkpoint."""

from __future__ import annotations

FAILED = 3


class RunStopped(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class HardStop(BaseException):
    """Raised from the signal handler on the third SIGINT/SIGTERM: abandon whatever is running
    (a checkpoint being written is removed; the previous one stays valid)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
