"""Measure the true peak memory of a training step.

Without a GPU: the model is built on the meta device, its parameters become fake CPU tensors
(FakeTensorMode: shapes, dtypes and strides, no storage), and two full optimizer steps of the
real step code (:mod:`swengine.train.step`) run under :class:`swkernels.memtrack.LiveBytes`,
which adds up live storage bytes (512 B granularity) and records the peak and its phase.
Fake CPU rather than fake CUDA tensors: autograd on a CPU-only torch build cannot run fake
CUDA tensors. On a CUDA machine, :func:`measure_cuda` runs the same steps for real and reads
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

import swkernels
from swengine.model.patch import decoder_layers
from swengine.planner.setup import Setup
from swengine.train.optim import build_optimizer
from swengine.train.step import forward_backward, optimizer_step
from swkernels.memtrack import LiveBytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    peak_phase: str
    weights_bytes: int  # parameters + buffers before the first step
    seconds: float
    device: str
    phase_peaks: dict[str, int] | None = None  # forward / head_backward / layers_backward / optimizer, last step


def _materialize_fake(model: nn.Module) -> None:
    """Replace meta parameters/buffers with fake CPU tensors (call inside FakeTensorMode),
    keeping tied parameters (e.g. input embeddings and LM head) tied."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                if id(b) not in made:
                    made[id(b)] = torch.empty(b.shape, dtype=b.dtype)
                module._buffers[name] = made[id(b)]


def build_training_model(config: PretrainedConfig, setup: Setup, device: str | torch.device,
                         lora_alpha: float | None = None) -> nn.Module:
    """The model as the loop trains it (:func:`swengine.model.build.build_training_model`) for a
    planner setup; alpha defaults to 2×rank (it changes no byte). With ``device="meta"`` the
    caller materialises it (as fake tensors) before use."""
    from swengine.model.build import build_training_model as build
    from swengine.model.patch import LoraSpec

    lora = LoraSpec(rank=setup.lora_rank, alpha=lora_alpha or 2.0 * setup.lora_rank, targets=setup.lora_targets)
    return build(config, lora, dtype=DTYPES[setup.dtype], device=device, quant=setup.quant, impl=setup.lora_impl,
                 attention=setup.attention, checkpointing=setup.checkpointing).model


def _fake_nf4_(model: nn.Module, double_quant: bool) -> int:
    """Give every adapted linear's base layer a fake NF4 weight (call inside FakeTensorMode).

    bitsandbytes' ``Params4bit`` cannot wrap fake tensors, but the fused NF4 kernel only reads
    the packed bytes and the ``quant_state`` (absmax, codes, nested state): a uint8 parameter of
    the packed size with a bitsandbytes ``QuantState`` of fake tensors has exactly the bytes and
    the code path of a quantised ``Linear4bit`` (blocksize 64, nested blocks of 256)."""
    from bitsandbytes.functional import QuantState

    from swengine.model.quant import BLOCKSIZE
    from swengine.planner.inventory import NESTED_BLOCK
    from swkernels.nn.lora import LoRALinear

    swapped = 0
    for module in model.modules():
        if not isinstance(module, LoRALinear):
            continue
        base = module.base_layer
        out_f, in_f = base.weight.shape
        numel = out_f * in_f
        blocks = -(-numel // BLOCKSIZE)
        packed = nn.Parameter(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
        code = torch.empty(16, dtype=torch.float32)
        if double_quant:
            state2 = QuantState(absmax=torch.empty(-(-blocks // NESTED_BLOCK), dtype=torch.float32),
                                code=torch.empty(256, dtype=torch.float32), blocksize=NESTED_BLOCK)
            qs = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8), shape=torch.Size((out_f, in_f)),
                            code=code, blocksize=BLOCKSIZE, quant_type="nf4", dtype=base.weight.dtype,
                            offset=torch.empty((), dtype=torch.float32), state2=state2)
        else:
            qs = QuantState(absmax=torch.empty(blocks, dtype=torch.float32), shape=torch.Size((out_f, in_f)),
                            code=code, blocksize=BLOCKSIZE, quant_type="nf4", dtype=base.weight.dtype)
        packed.quant_state = qs
        base._parameters["weight"] = packed
        swapped += 1
    return swapped


def _resident_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes quantisation state (absmax, nested absmax, codes):
    everything the model keeps on the device."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            tensors += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return tensors


def _run_steps(model: nn.Module, setup: Setup, vocab: int, device: str, mem: LiveBytes, steps: int = 2) -> None:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    params = [p for p in model.parameters() if p.requires_grad]
    # Paged 8-bit Adam allocates the same bytes as 8-bit Adam (in unified memory, which CPU
    # builds lack); bitsandbytes builds its quantisation maps from real values, outside fake mode.
    name = "adamw8bit" if setup.optimizer == "paged_adamw8bit" else setup.optimizer
    with unset_fake_temporarily():
        optimizer = build_optimizer(params, name)
    ids = torch.randint(0, vocab, (setup.micro_batch, setup.seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids}
    tracker = _PhaseTracker(mem)
    handles = tracker.attach(decoder_layers(model))
    try:
        for step in range(steps):
            tracker.step = step + 1
            forward_backward(model, batch, autocast_dtype=DTYPES[setup.dtype], on_phase=tracker.on_phase,
                             fused_loss=setup.loss == "fused")
            tracker.set("optimizer")
            optimizer_step(optimizer, params, max_grad_norm=1.0)
            gc.collect()
    finally:
        for h in handles:
            h.remove()


class _PhaseTracker:
    """Labels where in the step memory is used, so each phase's peak is a simple linear form:

    forward:attn / forward:mlp (inside decoder layers), forward:head (final norm, LM head, loss),
    head_backward (loss and LM head backward), layers_backward:recompute_attn / recompute_mlp
    (checkpointing's re-run of a layer), layers_backward:mlp / layers_backward:attn (the sub-block
    being backpropagated), optimizer. Labels come from module forward
    pre-hooks and tensor gradient hooks, which leave the autograd graph unchanged."""

    def __init__(self, mem):
        self.mem, self.stage, self.step = mem, "forward", 0

    def set(self, phase: str) -> None:
        self.mem.phase = f"{phase}#{self.step}"

    def on_phase(self, name: str) -> None:
        self.stage = "forward" if name == "forward" else "head_backward"
        self.set(self.stage)

    def _enter(self, sub: str):
        def hook(module, args):
            # in backward, a forward is checkpointing's recompute
            self.set(f"forward:{sub}" if self.stage == "forward" else f"layers_backward:recompute_{sub}")
        return hook

    def _grad_hook(self, sub: str):
        def on_grad(grad):
            self.stage = "layers_backward"
            self.set(f"layers_backward:{sub}")
        return on_grad

    def _exit(self, sub: str | None):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if sub is None:  # the last decoder layer finished: the head runs next
                if self.stage == "forward":
                    self.set("forward:head")
                sub_next = "mlp"  # its gradient arrives first at the last layer's MLP
            else:
                sub_next = sub
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._grad_hook(sub_next))
        return hook

    def attach(self, layers: list[nn.Module]) -> list:
        handles = [layers[-1].register_forward_hook(self._exit(None))]
        for layer in layers:
            for sub in ("self_attn", "mlp"):
                module = getattr(layer, sub)
                name = "attn" if sub == "self_attn" else "mlp"
                handles.append(module.register_forward_pre_hook(self._enter(name)))
                handles.append(module.register_forward_hook(self._exit(name)))
        return handles


def _last_step_phases(mem: LiveBytes, steps: int) -> dict[str, int]:
    suffix = f"#{steps}"
    return {k[: -len(suffix)]: v for k, v in mem.phase_peaks.items() if k.endswith(suffix)}


def measure_fake(config: PretrainedConfig, setup: Setup, steps: int = 2) -> Measurement:
    """Peak bytes of ``steps`` training steps, measured on fake CPU tensors (no real memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    nf4 = setup.quant != "none"
    if nf4 and setup.lora_impl != "swkernels":
        raise NotImplementedError("fake tensors cannot hold PEFT's bitsandbytes NF4 layers; measure PEFT+NF4 "
                                  "on real tensors (measure_real_cpu)")
    # NF4 on fake tensors: build with bf16 linears, then swap in fake NF4 weights (below)
    model = build_training_model(config, setup.with_(quant="none") if nf4 else setup, "meta")
    backend = "triton" if setup.lora_impl == "swkernels" else None
    with FakeTensorMode(allow_non_fake_inputs=True), swkernels.force_backend(backend), LiveBytes() as mem:
        _materialize_fake(model)
        if nf4:
            _fake_nf4_(model, double_quant=setup.quant == "nf4-dq")
        mem.count(*_resident_tensors(model))
        weights = mem.current
        mem.reset_peak()
        _run_steps(model, setup, config.vocab_size, "cpu", mem, steps)
    return Measurement(mem.peak, mem.peak_phase, weights, time.perf_counter() - start, "fake-cpu",
                       _last_step_phases(mem, steps))


def measure_real_cpu(config: PretrainedConfig, setup: Setup, steps: int = 2) -> Measurement:
    """The same steps on real CPU tensors (small models): the check that fake-mode accounting is exact."""
    start = time.perf_counter()
    model = build_training_model(config, setup, "cpu")
    from swkernels._backend import interpreting

    # the GPU path's allocations need the kernels (interpreted on CPU); else the torch fallback runs
    backend = "triton" if setup.lora_impl == "swkernels" and interpreting() else None
    with swkernels.force_backend(backend), LiveBytes() as mem:
        mem.count(*_resident_tensors(model))
        weights = mem.current
        mem.reset_peak()
        _run_steps(model, setup, config.vocab_size, "cpu", mem, steps)
    return Measurement(mem.peak, mem.peak_phase, weights, time.perf_counter() - start, "cpu",
                       _last_step_phases(mem, steps))


def measure_cuda(config: PretrainedConfig, setup: Setup, steps: int = 2, cap_bytes: int | None = None) -> Measurement:
    """Real peak on the current CUDA device (``torch.cuda.max_memory_allocated``).

    ``cap_bytes`` emulates a smaller card: the caching allocator may hold at most that much during
    the steps (not while building: a real loader streams weights in, already quantised), so a
    setup that does not fit raises ``torch.OutOfMemoryError``."""
    start = time.perf_counter()
    gc.collect()
    torch.cuda.empty_cache()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    model = build_training_model(config, setup, "cuda")
    weights = torch.cuda.memory_allocated() - base
    if cap_bytes is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_bytes + base_reserved) / total))
    torch.cuda.reset_peak_memory_stats()

    class _Phase:
        phase = "?"

    try:
        _run_steps(model, setup, config.vocab_size, "cuda", _Phase(), steps)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        if cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return Measurement(peak, "?", weights, time.perf_counter() - start, torch.cuda.get_device_name())
