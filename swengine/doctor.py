"""`swengine doctor`: what this machine has (versions, CUDA, GPUs) and, optionally, kernel health."""

from __future__ import annotations

import importlib.metadata
import platform

import swengine
from swengine.hardware import detect_gpus

PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "safetensors", "numpy",
            "nvidia-ml-py", "typer", "flash-attn")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(kernels: bool = False, archs: list[int] | None = None) -> dict:
    """The doctor report as a JSON-ready dict (schema: specs/doctor.schema.json)."""
    import torch

    from swkernels import _backend

    nvml = detect_gpus()
    cuda = torch.cuda.is_available()
    report = {
        "schema_version": swengine.SCHEMA_VERSION,
        "swengine_version": swengine.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda": {
            "available": cuda,
            "torch_cuda_version": torch.version.cuda,
            "device_count": torch.cuda.device_count() if cuda else 0,
        },
        "nvml": {"available": nvml.available, "driver_version": nvml.driver_version, "error": nvml.error},
        "gpus": [g.to_dict() for g in nvml.gpus],
        "kernel_backend": {
            "requested": _backend.requested_backend(),
            "triton_available": _backend.triton_available(),
            "triton_interpret": _backend.interpreting(),
            "cuda_tensors": "triton" if _backend.triton_available() and _backend.requested_backend() != "torch"
            else "torch",
            "cpu_tensors": _backend.select_backend("doctor", torch.empty(0)),
        },
        "kernel_health": None,
    }
    if kernels:
        from dataclasses import asdict

        from swkernels import health

        results = health.check(archs=archs)
        report["kernel_health"] = {"ok": all(r.ok for r in results), "results": [asdict(r) for r in results]}
    return report


def render(report: dict) -> str:
    """Human-readable doctor report."""
    lines = [f"swengine {report['swengine_version']} · Python {report['python']} · {report['platform']}", ""]
    lines.append("packages:")
    for name, ver in report["packages"].items():
        lines.append(f"  {name:<14} {ver or 'not installed'}")
    cuda = report["cuda"]
    lines.append("")
    if cuda["available"]:
        lines.append(f"CUDA: available (torch built for CUDA {cuda['torch_cuda_version']}, {cuda['device_count']} device(s))")
    elif cuda["torch_cuda_version"] is None:
        lines.append("CUDA: not available (this torch is a CPU build)")
    else:
        lines.append(f"CUDA: not available (torch built for CUDA {cuda['torch_cuda_version']}, but no usable GPU)")
    nvml = report["nvml"]
    if not nvml["available"]:
        lines.append(f"GPUs: none found: {nvml['error']}")
    elif not report["gpus"]:
        lines.append(f"GPUs: none (NVIDIA driver {nvml['driver_version']})")
    else:
        lines.append(f"GPUs (NVIDIA driver {nvml['driver_version']}):")
        for g in report["gpus"]:
            lines.append(f"  [{g['index']}] {g['name']}: {g['vram_total_bytes'] / 2**30:.1f} GiB total, "
                         f"{g['vram_free_bytes'] / 2**30:.1f} GiB free, sm_{g['compute_capability'].replace('.', '')}, "
                         f"bf16 {'yes' if g['bf16'] else 'no (fp16 training)'}")
    kb = report["kernel_backend"]
    lines.append(f"kernels: backend {kb['requested']}; CUDA tensors → {kb['cuda_tensors']}, CPU tensors → "
                 f"{kb['cpu_tensors']}{' (TRITON_INTERPRET=1)' if kb['triton_interpret'] else ''}")
    if report["kernel_health"] is not None:
        from swkernels.health import HealthResult, format_table

        lines.append("")
        lines.append(format_table([HealthResult(**r) for r in report["kernel_health"]["results"]]))
    return "\n".join(lines)
