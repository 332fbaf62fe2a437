"""Decides, in one place, how a swkernels op runs.

Rules (first match wins):
1. ``SWKERNELS_BACKEND=torch`` (or :func:`force_backend("torch")`): the pure-torch reference.
2. ``SWKERNELS_BACKEND=triton``: Triton; a real CPU tensor then needs ``TRITON_INTERPRET=1``.
3. auto (default): Triton for CUDA tensors, the Triton interpreter for CPU tensors when
   ``TRITON_INTERPRET=1``, otherwise the reference.

Fake tensors (FakeTensorMode, used by the planner to count memory) never run a kernel, so
"triton" is always allowed for them: the op's fake implementation runs instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger("swkernels")

BACKENDS = ("triton", "torch")
_ENV = "SWKERNELS_BACKEND"
_forced: str | None = None
_announced: set[tuple[str, str]] = set()


class BackendError(RuntimeError):
    """Raised when the requested backend cannot run the given tensors."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels execute in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def requested_backend() -> str:
    """The backend asked for: 'triton', 'torch' or 'auto'."""
    if _forced is not None:
        return _forced
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value not in (*BACKENDS, "auto"):
        raise BackendError(f"{_ENV}={value!r} is not valid; use one of: triton, torch, auto")
    return value


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Temporarily override the backend ('triton', 'torch', or None for the env/auto rule)."""
    global _forced
    if name is not None and name not in (*BACKENDS, "auto"):
        raise BackendError(f"unknown backend {name!r}; use one of: triton, torch, auto")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def select_backend(op: str, t: torch.Tensor) -> str:
    """Return 'triton' or 'torch' for running ``op`` on tensors like ``t``; logs the choice once."""
    want = requested_backend()
    fake = _is_fake(t)
    runnable = fake or t.is_cuda or (t.device.type == "cpu" and interpreting())
    if want == "torch":
        chosen, why = "torch", f"{_ENV}=torch"
    elif want == "triton":
        if not triton_available():
            raise BackendError(f"{_ENV}=triton but triton is not installed; pip install triton")
        if not runnable:
            raise BackendError(
                f"{_ENV}=triton cannot run {op} on a {t.device.type} tensor; "
                "use CUDA tensors or set TRITON_INTERPRET=1 (CPU interpreter)"
            )
        chosen, why = "triton", f"{_ENV}=triton"
    elif runnable and triton_available():
        chosen = "triton"
        why = "fake tensors" if fake else ("CUDA tensor" if t.is_cuda else "TRITON_INTERPRET=1")
    else:
        chosen, why = "torch", "no CUDA tensor and TRITON_INTERPRET unset" if triton_available() else "triton missing"
    if (op, chosen) not in _announced and not torch.compiler.is_compiling():  # logging breaks fullgraph tracing
        _announced.add((op, chosen))
        log.info("swkernels.%s runs on the %s backend (%s)", op, chosen, why)
    return chosen
