"""FSDP2 (``distributed.strategy=fsdp``): the base model's decoder sharded over the ranks with
PyTorch's ``fully_shard`` (one unit per decoder layer, the embeddings and final norm with the
decoder), so each rank holds 1/N of the frozen weights and of the adapter, its gradients and
optimizer states. NF4 (QLoRA) bases too: each packed weight becomes a plain uint8 parameter that
FSDP2 splits and gathers like any other, its bitsandbytes quantisation state (absmax and codes,
~1/16 of the packed bytes with double quant) kept whole beside it on every rank. The LM head stays whole on every rank (the fused loss reads its weight outside a
module call; a tied head keeps the embedding whole too).

Checkpoints keep the single-process format: the adapter and the optimizer state are gathered to
full tensors (a collective every rank joins) and rank 0 writes them; loading cuts each rank's shard
out of the full tensors. So a checkpoint resumes under any strategy and any number of ranks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from swengine.errors import UserError


def check_supported(cfg) -> None:
    """What FSDP2 here does not cover is refused with one line."""
    if cfg.lora.impl != "swkernels":
        raise UserError("distributed.strategy=fsdp needs lora.impl=swkernels (the PEFT path is not sharded)")


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder()


def shard_model(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """fully_shard every decoder layer, then the decoder; the trainable parameters after it (the
    sharded ones are new Parameter objects: build the optimizer over these)."""
    from torch.distributed.fsdp import fully_shard

    from swkernels.nn.lora import LoRALinear

    for module in model.modules():  # NF4 (QLoRA) bases: shard the packed bytes, keep each state beside them
        if isinstance(module, LoRALinear):
            module.detach_nf4_state()
    decoder = _decoder(model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError("distributed.strategy=fsdp: this model's decoder has no .layers to shard; use "
                        "distributed.strategy=ddp")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = decoder.get_input_embeddings()
    tied = {embed.weight} if head is not None and head.weight is embed.weight else set()
    units = []
    for layer in layers:
        units.append(fully_shard(layer))
    units.append(fully_shard(decoder, ignored_params=tied or None))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # the losses are already divided by the global token count: sum
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return [p for p in model.parameters() if p.requires_grad]


def frozen_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the frozen base this rank holds, bytes of the whole base): what sharding saved."""
    local = full = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        n = p.element_size()
        local += n * (p.to_local().numel() if is_sharded(p) else p.numel())
        full += n * p.numel()
    return local, full


def is_sharded(t) -> bool:
    return type(t).__name__ == "DTensor"


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module):
    """Every sharded module holds its full parameters (an all-gather all ranks join) inside."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state gathered to its full tensor (all ranks)."""
    sd = optimizer.state_dict()  # (its per-parameter dicts are the live state: build new ones)
    sd["state"] = {i: {k: v.full_tensor().cpu() if is_sharded(v) else v for k, v in state.items()}
                   for i, state in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full (single-process format) optimizer state; each rank keeps its shards."""
    from torch.distributed.tensor import distribute_tensor

    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not is_sharded(v) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements,
                                                 src_data_rank=None)


@torch.no_grad()
def load_adapter(handle, path: str | Path) -> None:
    """A saved (full) adapter into the sharded LoRA weights: each rank copies its shard."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    from swengine.model.adapter import PREFIX, WEIGHTS_NAME

    state = load_file(str(Path(path) / WEIGHTS_NAME))
    for name, layer in handle.lora.items():
        for ab in ("A", "B"):
            param = getattr(layer, f"lora_{ab}").weight
            full = state[f"{PREFIX}{name}.lora_{ab}.weight"].to(param.dtype)
            if is_sharded(param):
                local = param.to_local()
                local.copy_(distribute_tensor(full.to(local.device), param.device_mesh, param.placements,
                                              src_data_rank=None).to_local())
            else:
                param.copy_(full)
