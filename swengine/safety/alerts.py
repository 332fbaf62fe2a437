"""``--on-alert CMD``: run the user's shell command for each alert (a breaker trip, the end of a
failed run) with the event as one line of strict JSON on stdin, e.g. a desktop notification, a
chat webhook through curl, or a local text-to-speech command.

Training never waits for it: commands run one after another on a background thread (in order, so
spoken alerts do not overlap), each with a timeout after which it is killed. Its stdout is
discarded. A command that fails, times out or cannot start is reported as one warning line; the
run goes on. The event's main fields are also in the environment (``SWENGINE_ALERT_EVENT``,
``_RULE``, ``_ACTION``, ``_STEP``, ``_MESSAGE``) for commands that take arguments, e.g.
``--on-alert 'espeak "$SWENGINE_ALERT_MESSAGE"'``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from swengine.telemetry.logger import _finite

_STOP = object()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class AlertRunner:
    def __init__(self, command: str, timeout: float = 10.0, log: Callable[[str], None] | None = None,
                 max_queued: int = 16):
        self.command, self.timeout = command, timeout
        self.log = log or _stderr
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.sent = self.failed = self.dropped = 0

    def send(self, event: dict) -> bool:
        """Queue ``event`` for the command; returns at once. False (with a warning line) when the
        runner is closed or too many alerts are waiting."""
        if self._closed:
            return False
        bad: list[str] = []
        event = _finite(dict(event), "", bad)
        if bad:
            event["nonfinite"] = bad
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="swengine-alerts", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            self.log(f"warning: --on-alert: {self._queue.maxsize} alerts are still waiting for the command; "
                     f"dropped the one for step {event.get('step')}")
            return False
        return True

    def close(self, wait: float | None = None) -> None:
        """Let the queued alerts run, waiting at most ``wait`` seconds (default: the timeout);
        whatever is still running after that is left to finish on its own."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=0.1)
        except queue.Full:
            pass
        self._thread.join(self.timeout if wait is None else wait)

    def __enter__(self) -> AlertRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                problem = self._run(item)
            except Exception as exc:  # never let the thread die: a warning, then the next alert
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                self.failed += 1
                self.log(f"warning: --on-alert command {problem} (alert for step {item.get('step')}); "
                         "training goes on")
            else:
                self.sent += 1

    def _run(self, event: dict) -> str | None:
        """Run the command once; a short description of what went wrong, or None."""
        data = json.dumps(event, default=str, allow_nan=False) + "\n"
        env = dict(os.environ)
        for key in ("event", "rule", "action", "step", "message"):
            if event.get(key) is not None:
                env[f"SWENGINE_ALERT_{key.upper()}"] = str(event[key])
        try:
            proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=env, start_new_session=os.name == "posix")
        except OSError as exc:
            return f"could not start: {exc.strerror or exc}"
        try:
            _, err = proc.communicate(data.encode(), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            return f"timed out after {self.timeout:g} s and was killed"
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            return f"exited with status {proc.returncode}" + (f": {lines[-1][:200]}" if lines else "")
        return None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)  # the shell and what it started
            else:
                proc.kill()
        except OSError:
            pass
        try:
            proc.communicate(timeout=5)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            pass
