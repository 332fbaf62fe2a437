"""GPU detection through NVML (the nvidia-ml-py package, imported as ``pynvml``)."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DetectedGPU:
    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    compute_capability: str  # "8.6"
    bf16: bool  # native bf16 tensor cores: compute capability >= 8.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NvmlReport:
    available: bool
    driver_version: str | None
    gpus: tuple[DetectedGPU, ...]
    error: str | None  # why NVML could not be used, in plain words


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def detect_gpus() -> NvmlReport:
    """Every NVIDIA GPU NVML can see; never raises (a machine without a driver is normal)."""
    try:
        import pynvml
    except ImportError:
        return NvmlReport(False, None, (), "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlReport(False, None, (), f"NVML could not start ({exc}); no NVIDIA driver on this machine")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(DetectedGPU(i, _text(pynvml.nvmlDeviceGetName(handle)), int(mem.total), int(mem.free),
                                    f"{major}.{minor}", major >= 8))
        return NvmlReport(True, driver, tuple(gpus), None)
    except pynvml.NVMLError as exc:
        return NvmlReport(False, None, (), f"NVML query failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def visible_gpus(gpus: tuple[DetectedGPU, ...]) -> tuple[DetectedGPU, ...]:
    """The GPUs this process can use: NVML lists every GPU of the machine, CUDA only those named
    by CUDA_VISIBLE_DEVICES (unset: all; empty or -1: none; indices: those, in that order).
    Entries that are not indices (GPU UUIDs) cannot be matched to NVML's list here: all are kept."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return gpus
    picked = []
    for item in (x.strip() for x in env.split(",")):
        if not item.lstrip("-").isdigit():
            return gpus if item else tuple(picked)
        if int(item) < 0:
            break  # CUDA stops at the first invalid index
        picked += [g for g in gpus if g.index == int(item)]
    return tuple(picked)


@dataclass(frozen=True)
class GPUProfile:
    """Published figures for one GPU model (dense, no sparsity).

    ``tensor_tflops`` is bf16/fp16 tensor-core throughput *with fp32 accumulation* (what
    training uses; GeForce cards run it at half their fp16-accumulate rate); on the T4, which
    has no bf16, it is the fp16 figure.
    """

    key: str
    name: str
    vram_gib: float
    capability: str
    bf16: bool
    tensor_tflops: float
    fp32_tflops: float
    mem_gbps: float
    aliases: tuple[str, ...] = ()

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gib * 2**30)


def _p(key, name, vram, cc, tensor, fp32, gbps, *aliases):
    return GPUProfile(key, name, vram, cc, float(cc) >= 8.0, tensor, fp32, gbps, aliases)


GPU_PROFILES: dict[str, GPUProfile] = {p.key: p for p in (
    _p("t4", "Tesla T4", 15, "7.5", 65.0, 8.1, 320, "Tesla T4"),
    _p("rtx-3060", "GeForce RTX 3060 12GB", 12, "8.6", 25.6, 12.7, 360),
    _p("rtx-3060-ti", "GeForce RTX 3060 Ti", 8, "8.6", 32.4, 16.2, 448),
    _p("rtx-3070", "GeForce RTX 3070", 8, "8.6", 40.6, 20.3, 448),
    _p("rtx-3080", "GeForce RTX 3080 10GB", 10, "8.6", 59.5, 29.8, 760),
    _p("rtx-3080-12g", "GeForce RTX 3080 12GB", 12, "8.6", 61.3, 30.6, 912),
    _p("rtx-3090", "GeForce RTX 3090", 24, "8.6", 71.0, 35.6, 936),
    _p("rtx-4060", "GeForce RTX 4060", 8, "8.9", 30.3, 15.1, 272),
    _p("rtx-4060-ti", "GeForce RTX 4060 Ti 8GB", 8, "8.9", 44.2, 22.1, 288),
    _p("rtx-4060-ti-16g", "GeForce RTX 4060 Ti 16GB", 16, "8.9", 44.2, 22.1, 288),
    _p("rtx-4070", "GeForce RTX 4070", 12, "8.9", 58.4, 29.1, 504),
    _p("rtx-4070-ti", "GeForce RTX 4070 Ti", 12, "8.9", 80.2, 40.1, 504),
    _p("rtx-4070-ti-super", "GeForce RTX 4070 Ti SUPER", 16, "8.9", 88.2, 44.1, 672),
    _p("rtx-4080", "GeForce RTX 4080", 16, "8.9", 97.5, 48.7, 717),
    _p("rtx-4080-super", "GeForce RTX 4080 SUPER", 16, "8.9", 104.4, 52.2, 736),
    _p("rtx-4090", "GeForce RTX 4090", 24, "8.9", 165.2, 82.6, 1008),
    _p("rtx-5060-ti", "GeForce RTX 5060 Ti 16GB", 16, "12.0", 47.4, 23.7, 448),
    _p("rtx-5090", "GeForce RTX 5090", 32, "12.0", 209.5, 104.8, 1792),
    _p("a10g", "NVIDIA A10G", 24, "8.6", 70.0, 31.2, 600),
    _p("l4", "NVIDIA L4", 24, "8.9", 121.0, 30.3, 300),
    _p("a100-40g", "NVIDIA A100 40GB", 40, "8.0", 312.0, 19.5, 1555, "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"),
    _p("a100-80g", "NVIDIA A100 80GB", 80, "8.0", 312.0, 19.5, 2039, "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"),
    _p("h100", "NVIDIA H100 80GB HBM3 (SXM)", 80, "9.0", 989.0, 67.0, 3350, "NVIDIA H100 80GB HBM3"),
    _p("h200", "NVIDIA H200 (SXM)", 141, "9.0", 989.0, 67.0, 4800, "NVIDIA H200"),
    _p("h100-pcie", "NVIDIA H100 PCIe", 80, "9.0", 756.0, 51.0, 2000, "NVIDIA H100 PCIe"),
)}


def _model(name: str) -> str:
    """'NVIDIA GeForce RTX 4060 Ti 16GB' → 'rtx4060ti': vendor, brand and memory size dropped."""
    name = re.sub(r"\(.*?\)|\b\d+\s*gb\b|nvidia|geforce|tesla", " ", name.lower())
    return re.sub(r"[^a-z0-9]", "", name)


def profile_for(name: str, vram_bytes: int | None = None) -> GPUProfile | None:
    """The profile matching a key (``rtx-4090``) or a device name as NVML/torch report it
    (``NVIDIA GeForce RTX 4090``); VRAM picks among memory variants. None if unknown."""
    if name in GPU_PROFILES:
        return GPU_PROFILES[name]
    exact = [p for p in GPU_PROFILES.values() if name in p.aliases]
    want = _model(name)
    candidates = exact or [p for p in GPU_PROFILES.values() if _model(p.name) == want]
    if vram_bytes and len(candidates) > 1:
        return min(candidates, key=lambda p: abs(p.vram_bytes - vram_bytes))
    return candidates[0] if candidates else None
