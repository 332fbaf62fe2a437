import pytest

from swengine.hardware import GPU_PROFILES, DetectedGPU, detect_gpus, profile_for, visible_gpus

REQUIRED = ["t4", "rtx-3060", "rtx-3070", "rtx-3080", "rtx-3090", "rtx-4060", "rtx-4060-ti", "rtx-4070",
            "rtx-4070-ti", "rtx-4080", "rtx-4090", "a10g", "l4", "a100-40g", "a100-80g", "h100"]


def test_profile_table_is_complete_and_sane():
    for key in REQUIRED:
        assert key in GPU_PROFILES, key
    for p in GPU_PROFILES.values():
        assert p.vram_gib >= 8 and p.tensor_tflops > p.fp32_tflops > 0 and p.mem_gbps > 0, p.key
        assert p.bf16 == (float(p.capability) >= 8.0), p.key
    assert GPU_PROFILES["rtx-4090"].tensor_tflops == pytest.approx(165.2)
    assert GPU_PROFILES["h100"].mem_gbps == 3350


@pytest.mark.parametrize("name,vram_gib,key", [
    ("NVIDIA GeForce RTX 4090", 24, "rtx-4090"),
    ("NVIDIA GeForce RTX 4060 Ti", 16, "rtx-4060-ti-16g"),
    ("NVIDIA GeForce RTX 4060 Ti", 8, "rtx-4060-ti"),
    ("NVIDIA GeForce RTX 3080", 12, "rtx-3080-12g"),
    ("Tesla T4", 15, "t4"),
    ("NVIDIA A100-SXM4-80GB", 80, "a100-80g"),
    ("NVIDIA H100 80GB HBM3", 80, "h100"),
    ("NVIDIA H200", 140, "h200"),  # as torch and NVML named the leased GPU (2026-11-29)
    ("rtx-3090", None, "rtx-3090"),
])
def test_device_names_map_to_profiles(name, vram_gib, key):
    prof = profile_for(name, vram_gib * 2**30 if vram_gib else None)
    assert prof is not None and prof.key == key


def test_unknown_gpu_is_none():
    assert profile_for("Imaginary GPU 9000") is None


def test_detect_never_raises():
    report = detect_gpus()
    assert report.available or report.error


@pytest.mark.parametrize("env,want", [(None, [0, 1, 2]), ("", []), ("-1", []), ("2,0", [2, 0]), ("1,-1,2", [1]),
                                      ("GPU-8a1c", [0, 1, 2])])
def test_cuda_visible_devices_picks_what_the_process_can_use(env, want, monkeypatch):
    gpus = tuple(DetectedGPU(i, f"gpu{i}", 2**33, 2**33, "8.9", True) for i in range(3))
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert [g.index for g in visible_gpus(gpus)] == want
