"""GPU detection through NVML (the nvidia-ml-py package, imported as ``pynvml``)."""

from __future__ import annotations

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
