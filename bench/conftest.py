"""Benchmark session setup. On CPU, Triton kernels run in the interpreter (smoke runs only)."""

import datetime as _dt
import os
import platform
import subprocess

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One thread: CPU timings on a shared 2-core CI machine are far steadier, and the gate
    # compares ratios, which do not need the machine's full speed.
    torch.set_num_threads(int(os.environ.get("SWBENCH_THREADS", "1")))

import pytest  # noqa: E402


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        return None


def swengine_metadata() -> dict:
    from swengine.doctor import PACKAGES, _version
    from swengine.hardware import detect_gpus

    nvml = detect_gpus()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "commit": _commit(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "driver": nvml.driver_version,
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "versions": {name: _version(name) for name in PACKAGES},
    }
    if torch.cuda.is_available():
        from bench.harness import gpu_profile

        prof = gpu_profile()
        meta["gpu_profile"] = prof.key if prof else None
    return meta


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["swengine"] = swengine_metadata()


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
