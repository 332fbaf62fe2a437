"""Shared benchmark harness: every benchmark names its op, provider, role and shape, so that
`tools/bench_report.py` can pair ours with the baseline measured in the same run.

- CUDA: ``triton.testing.do_bench`` (median and 20/80 quantiles, ms), peak memory from
  ``torch.cuda.max_memory_allocated``, achieved GB/s or TFLOP/s against the GPU's published
  peak (``swengine.hardware.GPU_PROFILES``).
- CPU: pytest-benchmark rounds (the report uses the minimum) and peak bytes from
  :class:`swkernels.memtrack.LiveBytes`. Once both sides of a group have run, their functions are
  also timed *interleaved* (ours, baseline, ours, ...) and the median of the per-pair ratios is
  stored (``extra_info['paired']``): a noisy neighbour slows both sides of a pair alike, so the
  CI gate reads these ratios and needs no re-measure.
- Triton-interpreter runs (CPU + TRITON_INTERPRET=1) prove the code path only: they are
  labelled ``smoke`` and never compared.

``SWBENCH_SLOWDOWN=<n>`` runs every "ours" function n times: the injected regression that
tests the CI gate.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
OURS, BASELINE = "ours", "baseline"
CPU_TARGET_SECONDS = float(os.environ.get("SWBENCH_CPU_SECONDS", "0.25"))


def interpreting() -> bool:
    return not ON_CUDA and os.environ.get("TRITON_INTERPRET") == "1"


def gpu_profile():
    if not ON_CUDA:
        return None
    from swengine.hardware import profile_for

    props = torch.cuda.get_device_properties(0)
    return profile_for(props.name, props.total_memory)


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _slowed(fn: Callable[[], object], role: str) -> Callable[[], object]:
    n = int(os.environ.get("SWBENCH_SLOWDOWN", "1"))
    if role != OURS or n <= 1:
        return fn

    def slow():
        for _ in range(n):
            out = fn()
        return out

    return slow


def _peak_bytes(fn: Callable[[], object]) -> int:
    if ON_CUDA:
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from swkernels.memtrack import LiveBytes

    with LiveBytes() as mem:
        fn()
    return mem.peak


_SIDES: dict[str, dict[str, tuple[str, Callable[[], object]]]] = {}  # group → provider → (role, fn)
PAIRED_SECONDS = float(os.environ.get("SWBENCH_PAIRED_SECONDS", "1.0"))


def _timed_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratios(group: str, provider: str, role: str, fn: Callable[[], object]) -> dict[str, float]:
    """Baseline/ours ratios of ``fn`` against every opposite-role function already run in its group,
    timed alternately; the median of the per-pair ratios (keys as in tools/bench_report.py)."""
    import statistics

    import swkernels
    from swkernels import _backend

    forced = _backend._forced  # a benchmark may run inside force_backend(...): replay it the same way

    def replayable() -> object:
        with swkernels.force_backend(forced):
            return fn()

    sides = _SIDES.setdefault(group, {})
    out = {}
    for other, (other_role, other_fn) in sides.items():
        if other_role == role:
            continue
        ours, base = (fn, other_fn) if role == OURS else (other_fn, fn)
        one = _timed_once(ours) + _timed_once(base)
        pairs = int(min(40, max(5, PAIRED_SECONDS / max(one, 1e-6))))
        ratios = [_timed_once(base) / max(_timed_once(ours), 1e-9) for _ in range(pairs)]
        key = f"{provider} vs {other}" if role == OURS else f"{other} vs {provider}"
        out[key] = statistics.median(ratios)
    sides[provider] = (role, replayable)
    return out


def run(benchmark, fn: Callable[[], object], *, op: str, provider: str, role: str, shape: str,
        bytes_moved: int | None = None, flops: int | None = None, smoke: bool | None = None) -> None:
    """Benchmark ``fn`` (no arguments; closes over prepared inputs) and record metadata."""
    smoke = interpreting() if smoke is None else smoke
    fn = _slowed(fn, role)
    benchmark.group = f"{op} @ {shape}"
    info = benchmark.extra_info
    info.update(op=op, provider=provider, role=role, shape=shape, device=DEVICE, smoke=smoke)
    if bytes_moved:
        info["bytes_moved"] = int(bytes_moved)
    if flops:
        info["flops"] = int(flops)
    fn()  # warm-up: compile, autotune, allocator
    _sync()
    info["peak_mem_bytes"] = int(_peak_bytes(fn))
    if smoke:
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return
    if ON_CUDA:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        info.update(ms_median=med, ms_p20=p20, ms_p80=p80)
        prof = gpu_profile()
        if bytes_moved:
            info["gbps"] = bytes_moved / (med * 1e-3) / 1e9
            if prof:
                info["pct_of_peak_bw"] = 100 * info["gbps"] / prof.mem_gbps
        if flops:
            info["tflops"] = flops / (med * 1e-3) / 1e12
            if prof:
                info["pct_of_peak_tflops"] = 100 * info["tflops"] / prof.tensor_tflops

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=5, iterations=1)
        return
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    rounds = int(min(50, max(5, CPU_TARGET_SECONDS / once)))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    info["paired"] = paired_ratios(benchmark.group, provider, role, fn)
