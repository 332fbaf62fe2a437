"""A run owns its output_dir: ``<output_dir>/.swengine.lock`` holds the pid, host, start time and run
id of the live run, under an exclusive ``flock`` that the kernel drops when the process dies (kill -9
included). A second run in the same directory is refused; a lock file left by a dead process is
taken over with a message."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from swengine.errors import UserError

LOCK_NAME = ".swengine.lock"


def _lock_exclusive(fd: int) -> None:
    """A non-blocking exclusive lock the OS drops when the process dies: flock on POSIX, a byte
    lock via msvcrt on Windows (imported where used: each module exists on one OS only)."""
    try:
        import fcntl
    except ImportError:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def check_output_dir(out: Path) -> None:
    """One-line errors for an output_dir that is a file or cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a directory; choose another output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output_dir {out}: {exc.strerror or exc}; choose another output_dir") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out} is not writable; choose another output_dir or fix its permissions")


class RunLock:
    def __init__(self, out: Path, run_id: str):
        self.path = Path(out) / LOCK_NAME
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], None] = print) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"output_dir {self.path.parent} is not writable ({exc.strerror or exc}); "
                            "choose another output_dir") from None
        try:
            _lock_exclusive(fd)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock output_dir {self.path.parent}: {exc.strerror or exc}") from None
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                   if holder else "another process")
            raise UserError(f"output_dir {self.path.parent} is in use by a live run ({who}); wait for it to "
                            "finish or choose another output_dir") from None
        old = _read(fd)
        if old:
            log(f"taking over the stale lock of {self.path.parent}: its run (pid {old.get('pid')} on "
                f"{old.get('host')}, started {old.get('started')}) is no longer running")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = (json.dumps(info) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
        except OSError:
            pass  # the flock is what counts; the text is only for messages
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: a clean exit, nothing to take over
        except OSError:
            pass
        os.close(self._fd)  # the file stays: unlinking it would let two later runs lock two inodes
        self._fd = None


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?"}
