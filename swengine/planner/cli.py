"""`swengine plan`: resolve the model and GPU arguments, search, and print or return the plan."""

from __future__ import annotations

import math

from swengine.errors import UserError
from swengine.hardware import GPUProfile
from swengine.planner import speed as speed_model
from swengine.planner.search import GiB, Plan, max_context, plan
from swengine.planner.setup import Setup, Teacher

MAX_VRAM_GIB = 1 << 20  # 1 PiB: anything larger is a typo


def check_vram(vram_gib: float) -> None:
    """--vram must be a finite number of GiB > 0 (0, negative, nan and inf are errors, never ignored)."""
    if not math.isfinite(vram_gib) or vram_gib <= 0:
        raise UserError(f"--vram must be > 0 GiB (got {vram_gib:g}); e.g. --vram 24")
    if vram_gib > MAX_VRAM_GIB or int(vram_gib * GiB) < 1:
        raise UserError(f"--vram {vram_gib:g} GiB is not a plausible GPU memory size; give it in GiB, e.g. --vram 24")


def seq_len_warnings(config, seq_len: int) -> list[str]:
    """A sequence longer than the model's positions trains only with context extension: say so."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        factor = -(-seq_len // limit)
        return [f"--seq-len {seq_len} exceeds the model's max_position_embeddings={limit}: memory is planned, but "
                f"training at this length needs context extension, e.g. context.rope_scaling="
                f"'{{\"rope_type\": \"yarn\", \"factor\": {factor}}}'"]
    return []


def resolve_gpu(gpu: str | None, vram_gib: float | None) -> tuple[str, int, GPUProfile | None]:
    """(display name, VRAM bytes, the GPU's published figures or None) from --gpu/--vram or the
    detected GPU."""
    from swengine.hardware import GPU_PROFILES, detect_gpus, profile_for, visible_gpus

    if vram_gib is not None:
        check_vram(vram_gib)
    if gpu:
        prof = profile_for(gpu)
        if prof is None:
            raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(GPU_PROFILES)} (or give --vram GIB)")
        vram = int(vram_gib * GiB) if vram_gib is not None else prof.vram_bytes
        return prof.name, vram, prof
    if vram_gib is not None:
        return f"a {vram_gib:g} GiB GPU", int(vram_gib * GiB), None
    report = detect_gpus()
    gpus = visible_gpus(report.gpus)
    if not gpus:
        why = f" ({report.error})" if report.error else (" (CUDA_VISIBLE_DEVICES hides every GPU)" if report.gpus else "")
        raise UserError(f"no GPU found{why}; say which one to plan for with --gpu NAME (e.g. rtx-4090) or --vram GIB")
    g = gpus[0]
    prof = profile_for(g.name, g.vram_total_bytes)
    return g.name, g.vram_total_bytes, prof


def make_plan(model: str, *, gpu: str | None = None, vram_gib: float | None = None, seq_len: int = 2048,
              batch: int = 16, rank: int | None = None, qlora: bool | None = None, teacher: str | None = None,
              teacher_quant: str = "none", lora_impl: str = "swkernels", loss: str = "fused",
              want_max_context: bool = False, prefer: str = "speed", alternatives: int = 3,
              fixed: dict | None = None, shard_world: int = 1) -> Plan:
    from swengine.model.config import load_model_config

    config = load_model_config(model)
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1 (got {seq_len})")
    if batch < 1:
        raise UserError(f"--batch must be >= 1 (got {batch})")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be >= 1 (got {rank})")
    if alternatives < 0:
        raise UserError(f"--alternatives must be >= 0 (got {alternatives})")
    if shard_world < 1:
        raise UserError(f"--fsdp must be >= 1 GPUs (got {shard_world})")
    if teacher:
        load_model_config(teacher)  # validate early, with the same message
    name, vram, profile = resolve_gpu(gpu, vram_gib)
    base = Setup(seq_len=seq_len, lora_impl=lora_impl, loss=loss, shard_world=shard_world,
                 teacher=Teacher(teacher, teacher_quant) if teacher else None)
    result = plan(config, model, gpu=name, vram_bytes=vram, seq_len=seq_len, effective_batch=batch, rank=rank,
                  qlora=qlora, base=base, speed=speed_model.model_for(profile, lora_impl), prefer=prefer,
                  alternatives=alternatives, fixed=fixed)
    if shard_world > 1:
        result.reasons.append(f"one rank of {shard_world} under FSDP2: the decoder layers' weights, the adapters and "
                              "their optimizer states are sharded (plus two layers gathered at a time)")
    if profile is None:  # a bare --vram: the speed model only ranks, its tokens/s mean nothing
        result.tokens_per_second = None
        for alt in result.alternatives:
            alt.tokens_per_second = None
    if want_max_context and result.estimate is not None:
        result.max_context = max_context(config, result.estimate.setup, vram)
    limit = getattr(config, "max_position_embeddings", None)
    # report.to_dict/render read these two (Plan itself lives in search.py)
    result.max_position_embeddings = limit if isinstance(limit, int) else None
    result.warnings = seq_len_warnings(config, seq_len)
    return result
