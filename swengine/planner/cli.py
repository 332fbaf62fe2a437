"""`swengine plan`: resolve the model and GPU arguments, search, and print or return the plan."""

from __future__ import annotations

from swengine.errors import UserError
from swengine.planner.search import GiB, Plan, max_context, plan
from swengine.planner.setup import Setup, Teacher


def resolve_gpu(gpu: str | None, vram_gib: float | None) -> tuple[str, int, float | None]:
    """(display name, VRAM bytes, peak tensor TFLOP/s or None) from --gpu/--vram or the detected GPU."""
    from swengine.hardware import GPU_PROFILES, detect_gpus, profile_for, visible_gpus

    if gpu:
        prof = profile_for(gpu)
        if prof is None:
            raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(GPU_PROFILES)} (or give --vram GIB)")
        vram = int(vram_gib * GiB) if vram_gib else prof.vram_bytes
        return prof.name, vram, prof.tensor_tflops
    if vram_gib:
        if vram_gib <= 0:
            raise UserError(f"--vram must be positive (got {vram_gib})")
        return f"a {vram_gib:g} GiB GPU", int(vram_gib * GiB), None
    report = detect_gpus()
    gpus = visible_gpus(report.gpus)
    if not gpus:
        why = f" ({report.error})" if report.error else (" (CUDA_VISIBLE_DEVICES hides every GPU)" if report.gpus else "")
        raise UserError(f"no GPU found{why}; say which one to plan for with --gpu NAME (e.g. rtx-4090) or --vram GIB")
    g = gpus[0]
    prof = profile_for(g.name, g.vram_total_bytes)
    return g.name, g.vram_total_bytes, prof.tensor_tflops if prof else None


def make_plan(model: str, *, gpu: str | None = None, vram_gib: float | None = None, seq_len: int = 2048,
              batch: int = 16, rank: int | None = None, qlora: bool | None = None, teacher: str | None = None,
              teacher_quant: str = "none", lora_impl: str = "swkernels", loss: str = "fused",
              want_max_context: bool = False) -> Plan:
    from swengine.model.config import load_model_config

    config = load_model_config(model)
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1 (got {seq_len})")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be >= 1 (got {rank})")
    if teacher:
        load_model_config(teacher)  # validate early, with the same message
    name, vram, tflops = resolve_gpu(gpu, vram_gib)
    base = Setup(seq_len=seq_len, lora_impl=lora_impl, loss=loss,
                 teacher=Teacher(teacher, teacher_quant) if teacher else None)
    result = plan(config, model, gpu=name, vram_bytes=vram, seq_len=seq_len, effective_batch=batch, rank=rank,
                  qlora=qlora, base=base, peak_tflops=tflops)
    if want_max_context and result.estimate is not None:
        result.max_context = max_context(config, result.estimate.setup, vram)
    return result
