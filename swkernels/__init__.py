"""swkernels: fused Triton kernels for LoRA fine-tuning on consumer GPUs.

Every op has a pure-torch reference in :mod:`swkernels.reference`; :mod:`swkernels._backend`
picks Triton (CUDA tensors, or the CPU interpreter under TRITON_INTERPRET=1) or the reference.
"""

from swkernels import nn  # module wrappers over the ops below
from swkernels._backend import force_backend, select_backend
from swkernels.ops.distill_loss import distill_loss
from swkernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from swkernels.ops.fused_linear_distill import fused_linear_distill
from swkernels.ops.gelu_mul import gelu_mul
from swkernels.ops.lora_linear import lora_linear
from swkernels.ops.nf4_lora_linear import nf4_lora_linear
from swkernels.ops.rms_norm import rms_norm
from swkernels.ops.rope import apply_rope, apply_rope_
from swkernels.ops.silu_mul import silu_mul
from swkernels.rope_scaling import rope_inv_freq

__version__ = "0.1.0"

__all__ = ["apply_rope", "apply_rope_", "distill_loss", "force_backend", "fused_linear_cross_entropy",
           "gelu_mul",
           "fused_linear_distill", "lora_linear", "nf4_lora_linear", "nn", "rms_norm", "rope_inv_freq", "select_backend",
           "silu_mul"]
