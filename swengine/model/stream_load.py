"""Streaming NF4 load (QLoRA on machines with little host RAM).

The model skeleton is built on the meta device (no memory), then the weights stream from the
safetensors shards tensor by tensor: each target linear is quantised to NF4 on the target device
as it arrives (:func:`swengine.model.quant.nf4_linear`, the layout :func:`quantize_nf4_` gives,
so swkernels' NF4 LoRA kernel and PEFT run over it unchanged), every other tensor is cast to the
compute dtype and moved. Tied weights are re-tied, the rotary ``inv_freq`` buffers recomputed
from the config (as transformers' ``_init_weights`` does). Host RAM holds at most the shard being
read (safetensors memory-maps it; its pages leave with the mapping) plus one tensor in flight; the
device holds the NF4 model plus one weight in the compute dtype.

Checkpoints whose config carries a bitsandbytes 4-bit NF4 ``quantization_config`` (what
transformers' ``save_pretrained`` writes for a ``load_in_4bit`` model) load as they are: the
packed uint8 weight and its quant-state tensors (``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``) become a ``Params4bit`` through
``Params4bit.from_prequantized``, no re-quantisation.

Everything that could stop the load (keys that do not map onto the model one to one, missing
weights) is checked from the shard headers before any weight is read, and raised as
:class:`StreamUnsupported` so the caller can fall back to transformers' loader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"


class StreamUnsupported(Exception):
    """This checkpoint cannot be streamed (the reason is the message); load it another way."""


def shard_files(path: str | Path) -> list[Path] | None:
    """The safetensors files of a local model directory (sharded with an index, or one file), in
    the index's order; None when ``path`` is not such a directory (a hub id, .bin weights)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if (p / INDEX).is_file():
        try:
            weight_map = json.loads((p / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        names = list(dict.fromkeys(weight_map.values()))
        files = [p / n for n in names]
        return files if files and all(f.is_file() for f in files) else None
    return [p / SINGLE] if (p / SINGLE).is_file() else None


def prequantized_nf4(config) -> bool:
    """Does ``config`` carry a bitsandbytes 4-bit NF4 ``quantization_config``?"""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else vars(qc))
    return (qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))
            and qc.get("bnb_4bit_quant_type", "fp4") == "nf4")


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Every checkpoint key the model expects: name → (module, attribute, is_parameter).
    Parameters shared by several modules (tied) appear under each name."""
    slots = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in module._parameters.items():
            if p is not None:
                slots[prefix + name] = (module, name, True)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                slots[prefix + name] = (module, name, False)
    return slots


def _tied_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(target, source) parameter names transformers ties (e.g. lm_head.weight → embed_tokens)."""
    try:
        pairs = list(model.get_expanded_tied_weights_keys(all_submodels=True).items())
    except (AttributeError, TypeError):
        pairs = []
        if getattr(model.config, "tie_word_embeddings", False):
            out, inp = model.get_output_embeddings(), model.get_input_embeddings()
            names = {id(m): n for n, m in model.named_modules()}
            if out is not None and inp is not None and id(out) in names and id(inp) in names:
                pairs = [(f"{names[id(out)]}.weight", f"{names[id(inp)]}.weight")]
    return pairs


def _rotary_buffers(module: nn.Module, device: torch.device) -> None:
    """Recompute a rotary module's ``inv_freq`` / ``original_inv_freq`` from its config, as
    transformers' ``PreTrainedModel._init_weights`` does after a meta-device init."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fns = {"axial": getattr(module, "compute_axial_rope_parameters", None),
           "ntk_alpha": getattr(module, "compute_ntk_alpha_rope_parameters", None),
           "default": getattr(module, "compute_default_rope_parameters", None), **ROPE_INIT_FUNCTIONS}
    fn = fns.get(getattr(module, "rope_type", "default"))
    if fn is None:
        raise StreamUnsupported(f"cannot recompute the rotary buffers of {type(module).__name__}")
    inv_freq, _ = fn(module.config)
    module.inv_freq = inv_freq.to(device)
    if "original_inv_freq" in module._buffers:
        module.original_inv_freq = inv_freq.clone().to(device)


def _own(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (a view of the memory-mapped shard) copied onto ``device``, floats cast to ``dtype``:
    one copy always, so no parameter keeps a shard's mapping (and its pages) alive."""
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)


def _release_freed_host_memory() -> None:
    """Hand the transient buffers' freed heap back to the OS (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _skeleton(config, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def _read_headers(files: list[Path]) -> dict[str, Path]:
    from safetensors import SafetensorError, safe_open

    where = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    where[key] = f
        except (OSError, SafetensorError) as exc:  # the transformers path words it for the user
            raise StreamUnsupported(f"{f}: {exc}") from None
    return where


def stream_load_nf4(path: str | Path, config, dtype: torch.dtype, device: torch.device | str, *,
                    attn_implementation: str = "sdpa", targets: tuple[str, ...] = ("all-linear",),
                    double_quant: bool = True, progress: bool = True) -> nn.Module:
    """Load the causal LM in ``path`` (a local directory of safetensors shards) with its LoRA
    target linears (``targets``, as :func:`swengine.model.patch.resolve_targets` reads them) in
    NF4 on ``device`` and everything else in ``dtype`` there, streaming tensor by tensor; or, when
    ``config`` carries a bitsandbytes NF4 ``quantization_config``, its packed weights as they are.
    The result equals ``from_pretrained`` + :func:`quantize_nf4_` + ``.to(device)``: eval mode but
    for the ``Linear4bit`` modules, in train mode as :func:`quantize_nf4_` leaves them (see the end).
    Raises :class:`StreamUnsupported` (before reading any weight) for checkpoints it cannot map."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from swengine.model.patch import resolve_targets
    from swengine.model.quant import nf4_linear

    files = shard_files(path)
    if not files:
        raise StreamUnsupported(f"{path} is not a local directory of safetensors weights")
    device = torch.device(device)
    prequant = prequantized_nf4(config)
    where = _read_headers(files)
    model = _skeleton(config, dtype, attn_implementation)
    slots = _slots(model)
    for module in model.modules():  # non-persistent buffers: only the rotary ones can be recomputed
        rotary = "RotaryEmbedding" in type(module).__name__ and "inv_freq" in module._buffers
        if module._non_persistent_buffers_set and not rotary:
            raise StreamUnsupported(f"cannot recompute the buffers of {type(module).__name__}")

    # which linears hold NF4: the LoRA targets (fresh), or those the checkpoint packed (pre-quantised)
    head = model.get_output_embeddings()
    quantised: dict[str, tuple[nn.Module, str, nn.Module]] = {}  # "<module path>.weight" → (parent, child name, linear)
    names = None if prequant else set(resolve_targets(model, targets))
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is not nn.Linear or child is head:
                continue
            key = f"{parent_name}.{child_name}.weight" if parent_name else f"{child_name}.weight"
            if (key + QUANT_STATE_SUFFIX in where) if prequant else (child_name in names):
                quantised[key] = (parent, child_name, child)

    # map every checkpoint key onto the model before reading anything
    prefix = getattr(model, "base_model_prefix", "") or ""
    stats: dict[str, list[str]] = {k: [] for k in quantised}  # packed weight → its quant-state keys
    plan: dict[str, str] = {}  # checkpoint key → model key
    for key in where:
        if prequant and ".weight." in key and key.split(".weight.")[0] + ".weight" in quantised:
            stats[key.split(".weight.")[0] + ".weight"].append(key)
            continue
        for cand in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if cand in slots:
                plan[key] = cand
                break
        else:
            if key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved it; recomputed below
                continue
            raise StreamUnsupported(f"checkpoint key {key} has no place in the model")
    loaded = set(plan.values())
    tied = _tied_pairs(model)
    for target, source in tied:
        if target not in loaded and source not in loaded:
            raise StreamUnsupported(f"neither {target} nor {source} is in the checkpoint")
    tied_names = {n for pair in tied for n in pair}
    missing = sorted(set(slots) - loaded - tied_names)
    if missing:
        raise StreamUnsupported(f"{len(missing)} weight(s) missing from the checkpoint, e.g. {missing[0]}")
    if prequant and any(not any(s.endswith(QUANT_STATE_SUFFIX) for s in stats[k]) for k in quantised):
        raise StreamUnsupported("a packed weight has no quant state")

    pending: dict[str, dict[str, torch.Tensor]] = {}  # pre-quantised: weight key → tensors seen so far
    bias_of: dict[str, torch.Tensor] = {}
    done: set[str] = set()

    def place_nf4(wkey: str, weight: torch.Tensor | None, packed: dict[str, torch.Tensor] | None) -> None:
        parent, child_name, lin = quantised[wkey]
        bias_key = wkey[: -len("weight")] + "bias"
        bias = bias_of.pop(bias_key, None) if lin.bias is not None else None
        if prequant:
            import bitsandbytes as bnb

            data = packed.pop(wkey)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit.from_prequantized(
                data, {k[len(wkey) + 1:]: v for k, v in packed.items()}, requires_grad=False, device=device, module=q)
            q.weight.quant_state.dtype = dtype  # dequantise into the compute dtype, as a fresh quantisation does
            if bias is not None:
                q.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        else:
            q = nf4_linear(weight.to(device), bias, double_quant=double_quant, compute_dtype=dtype, device=device)
        setattr(parent, child_name, q)
        done.add(wkey)
        if device.type == "cpu":  # quantising on the host: its temporaries would pile up as heap fragments
            _release_freed_host_memory()

    bar = tqdm(total=len(where), desc=f"Loading {Path(path).name} ({'NF4, pre-quantised' if prequant else 'NF4'})",
               unit="tensor", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:  # memory-mapped: pages go with the mapping
                for key in sf.keys():
                    if where.get(key) != f:
                        continue
                    bar.update(1)
                    group = key.split(".weight.")[0] + ".weight" if prequant and ".weight." in key else key
                    if group in quantised and prequant:
                        bucket = pending.setdefault(group, {})
                        bucket[key] = _own(sf.get_tensor(key), device)
                        if len(bucket) == len(stats[group]) + 1 and group in bucket:
                            place_nf4(group, None, pending.pop(group))
                        continue
                    if key not in plan:
                        continue
                    mkey = plan[key]
                    if mkey in quantised:
                        place_nf4(mkey, sf.get_tensor(key), None)
                        continue
                    owner = mkey[: -len("bias")] + "weight" if mkey.endswith(".bias") else None
                    if owner in quantised and owner not in done:
                        bias_of[mkey] = _own(sf.get_tensor(key), device)  # placed with its weight
                        continue
                    if owner in quantised:  # weight already placed: set the bias on its Linear4bit
                        parent, child_name, _ = quantised[owner]
                        getattr(parent, child_name).bias = nn.Parameter(
                            _own(sf.get_tensor(key), device, dtype), requires_grad=False)
                        continue
                    module, name, is_param = slots[mkey]
                    t = _own(sf.get_tensor(key), device, dtype)
                    if is_param:
                        setattr(module, name, nn.Parameter(t, requires_grad=t.is_floating_point()))
                    else:
                        module._buffers[name] = t
    finally:
        bar.close()
    if pending or len(done) != len(quantised):
        raise RuntimeError(f"streaming load of {path}: {len(quantised) - len(done)} NF4 weight(s) incomplete")

    for target, source in tied:  # re-tie: the skeleton's shared meta parameter was replaced above
        t_mod, t_name, _ = slots[target]
        s_mod, s_name, _ = slots[source]
        t_p, s_p = getattr(t_mod, t_name), getattr(s_mod, s_name)
        if t_p.is_meta and not s_p.is_meta:
            setattr(t_mod, t_name, s_p)
        elif s_p.is_meta and not t_p.is_meta:
            setattr(s_mod, s_name, t_p)
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            if "RotaryEmbedding" in type(module).__name__ and "inv_freq" in module._buffers:
                _rotary_buffers(module, device)
            else:
                raise RuntimeError(f"streaming load of {path}: buffers of {type(module).__name__} left uninitialised")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"streaming load of {path}: {len(left)} parameter(s) left unloaded, e.g. {left[0]}")

    _release_freed_host_memory()
    model.config._name_or_path = str(path)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        pass
    model.eval()  # as from_pretrained leaves it; but the NF4 linears stay in train mode, as quantize_nf4_
    # (which creates them after from_pretrained's eval()) leaves them: bitsandbytes' Linear4bit in eval
    # mode on an AVX512-bf16 CPU repacks its weight on the first no-grad forward into a CPU layout with
    # bf16 scales (lossy, and no longer the layout swkernels' NF4 kernel reads)
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.train()
    return model
