"""Registry of Triton kernel configurations, checked ahead of time by :mod:`swkernels.health`.

Each op module registers the kernels it launches and the configs it may pick (its autotune
list), so the health check compiles exactly what can run on a user's GPU.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class KernelSpec:
    """One compilable kernel configuration.

    ``signature`` maps every kernel argument to a Triton type (``"*fp16"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); the placeholder ``{dtype}`` is replaced by each entry of
    ``dtypes`` (bf16 is skipped on archs without it, e.g. sm_75).
    """

    op: str
    kernel: Any  # a @triton.jit function (or an Autotuner wrapping one)
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    dtypes: tuple[str, ...] = DTYPES
    min_arch: int = 75

    @property
    def kernel_name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    @property
    def label(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return f"{self.kernel_name}[{meta},w{self.num_warps},s{self.num_stages}]"


_REGISTRY: list[KernelSpec] = []


def register(*specs: KernelSpec) -> None:
    """Add kernel configurations to the health-check registry (called at op import)."""
    _REGISTRY.extend(specs)


def registered() -> list[KernelSpec]:
    """Every registered spec, after importing all op modules under ``swkernels.ops``."""
    import swkernels.ops as ops

    for mod in pkgutil.iter_modules(ops.__path__):
        importlib.import_module(f"swkernels.ops.{mod.name}")
    return list(_REGISTRY)
