"""The analytic memory model: peak bytes of a training step in milliseconds.

peak = static (exact: base weights, LoRA adapters, optimizer states)
     + max over phases (forward end → LM-head/loss backward, decoder-layer backward, optimizer)
       of a linear form in the setup's features (see :mod:`swengine.planner.features`) whose
       coefficients were calibrated per model family and setup profile against the fake-tensor
       measuring harness (:mod:`swengine.planner.calibrate`).

What the calibrated coefficients stand for (Llama, PEFT fp32 adapters, SDPA, per token and
layer): 18·h + 6·q + 4·kv + 8·i + 2·r·targets + 3.5·heads bytes kept for backward (the fp32
RMSNorm inputs, bf16 projection inputs and PEFT's bf16 copies of them, SwiGLU's gate/up/product,
SDPA's q/k/v/output and fp32 log-sum-exp), 12·vocab bytes per token at the loss backward
(transformers upcasts the logits to fp32: bf16 logits + fp32 log-softmax + its gradient), 2 B per
trainable parameter for autocast's bf16 copies of the adapters and 4 B for their gradients.

On a real GPU add the CUDA context and the caching allocator's slack; both are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from swengine.errors import UserError
from swengine.planner.calibrate import load_calibration, profile_key
from swengine.planner.features import features
from swengine.planner.inventory import Inventory, inventory
from swengine.planner.setup import Setup
from swengine.planner.static import StaticBytes, lora_targets, static_bytes

CUDA_CONTEXT_BYTES = 400 * 2**20  # CUDA context + cuBLAS/cuDNN workspaces: 250-450 MB measured
ALLOCATOR_SLACK = 0.08  # with expandable_segments (set by the trainer); 10-35% without
from swengine.planner.calibrate import PHASES  # noqa: E402

_calibration: dict | None = None


GENERIC_FAMILY = "llama"  # families with no calibration of their own are planned with these coefficients


def _coefficients(family: str, setup: Setup) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The calibrated per-phase coefficients for the family and setup profile, and notes: a family
    the planner was never calibrated for (its layer is still counted exactly: static bytes and
    features come from its real inventory) gets the generic (Llama) coefficients, and says so."""
    global _calibration
    if _calibration is None:
        _calibration = load_calibration()
    key = profile_key(family, setup)
    if key in _calibration:
        return _calibration[key]["phases"], []
    generic = profile_key(GENERIC_FAMILY, setup)
    if generic not in _calibration:
        known = sorted({k.split("|")[0] for k in _calibration})
        raise UserError(f"the planner has no calibration for {key} (calibrated families: {', '.join(known)}); "
                        "run tools/calibrate_planner.py")
    return _calibration[generic]["phases"], [
        f"model family {family!r} is not calibrated: its activations are planned with the generic "
        f"({GENERIC_FAMILY}) coefficients, so allow a few percent more headroom (tools/calibrate_planner.py calibrates it)"]


@dataclass
class Estimate:
    model: str
    setup: Setup
    components: dict[str, int]  # named parts of the peak; they sum to peak_allocated
    peak_allocated: int  # what torch.cuda.max_memory_allocated would report
    peak_phase: str
    cuda_context: int
    allocator_slack: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_vram(self) -> int:
        """VRAM the process needs: peak allocated + allocator slack + CUDA context."""
        return self.peak_allocated + self.allocator_slack + self.cuda_context


def _group(coef: dict[str, float], f: dict[str, float]) -> dict[str, float]:
    groups = {"activations": 0.0, "logits_and_loss": 0.0, "layer_workspace": 0.0, "adapter_grads_and_casts": 0.0,
              "other": 0.0}
    for k, c in coef.items():
        v = c * f[k]
        if k.startswith("LT*"):
            groups["activations"] += v
        elif k == "T*V":
            groups["logits_and_loss"] += v
        elif k.startswith("T*"):
            groups["layer_workspace"] += v
        elif k in ("P", "P1"):
            groups["adapter_grads_and_casts"] += v
        else:
            groups["other"] += v
    # the least-squares fit can give a small group a negative share: net it against activations,
    # so every reported component is >= 0 and they still sum to the peak
    for name in list(groups):
        if name != "activations" and groups[name] < 0:
            groups["activations"] += groups[name]
            groups[name] = 0.0
    return groups


def _peft_nf4_dequant_bytes(inv: Inventory, setup: Setup) -> int:
    """PEFT + bitsandbytes dequantises each NF4 weight to a full bf16 copy around its matmul."""
    if setup.quant == "none" or setup.lora_impl != "peft":
        return 0
    return max(2 * li.in_features * li.out_features for li in lora_targets(inv, setup))


def _teacher_bytes(setup: Setup, student: Inventory) -> tuple[int, int, list[str]]:
    """(static teacher weights, transient at the loss) for online distillation; analytic only."""
    if setup.teacher is None:
        return 0, 0, []
    from swengine.model.config import load_model_config

    tinv = inventory(load_model_config(setup.teacher.model))
    # the teacher loads like a QLoRA base (every linear NF4 when quantised); only its weights count
    tsetup = Setup(seq_len=setup.seq_len, micro_batch=setup.micro_batch, quant=setup.teacher.quant)
    weights = static_bytes(tinv, tsetup).base_weights
    T = setup.tokens
    # no-grad forward: one layer's temporaries live at a time; logits bf16 (+ fp32 copy unfused)
    layer_tmp = T * (4 * tinv.hidden + 4 * tinv.intermediate + 2 * tinv.q_dim + 4 * tinv.kv_dim)
    logits = T * tinv.vocab * (2 if setup.loss == "fused" else 6)
    return weights, max(layer_tmp, logits), [
        f"teacher {setup.teacher.model} ({setup.teacher.quant}) is modelled analytically, not yet measured"]


def estimate(config: PretrainedConfig, setup: Setup, model_name: str = "") -> Estimate:
    """Analytic peak memory of one training step of ``config`` under ``setup``."""
    inv = inventory(config)
    st: StaticBytes = static_bytes(inv, setup)
    f = features(inv, setup, st.lora_numel, st.lora_numel_per_layer)
    coefs, family_notes = _coefficients(inv.family, setup)
    phase_dyn = {p: sum(c * f[k] for k, c in coefs[p].items()) for p in PHASES}
    dequant = _peft_nf4_dequant_bytes(inv, setup)
    for p in PHASES:
        if p.startswith("layers_backward"):
            phase_dyn[p] += dequant
    t_weights, t_transient, teacher_notes = _teacher_bytes(setup, inv)
    notes = family_notes + teacher_notes
    phase_dyn["head_backward"] += t_transient
    phase = max(PHASES, key=lambda p: phase_dyn[p])
    groups = _group(coefs[phase], f)
    components = {
        "base_weights": st.base_weights,
        "lora_params": st.lora_params,
        "optimizer_states": st.optimizer_states,
        **{k: int(round(v)) for k, v in groups.items()},
    }
    if dequant and phase.startswith("layers_backward"):
        components["nf4_dequant_buffer"] = dequant
    if setup.teacher is not None:
        components["teacher_weights"] = t_weights
        if phase == "head_backward":
            components["teacher_logits_and_forward"] = t_transient
    peak = sum(components.values())
    return Estimate(model=model_name or getattr(config, "name_or_path", "") or inv.family, setup=setup,
                    components=components, peak_allocated=peak, peak_phase=phase,
                    cuda_context=CUDA_CONTEXT_BYTES, allocator_slack=int(ALLOCATOR_SLACK * peak), notes=notes)
