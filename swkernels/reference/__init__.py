"""Pure-torch references: the test oracle for every kernel and the fallback when Triton cannot run.

One module per op, mirroring ``swkernels/ops``. References favour clarity over speed and
compute in fp32, casting the result to the input dtype, as the kernels do.
"""

from swkernels.reference.gelu_mul import gelu_mul, gelu_mul_backward
from swkernels.reference.lora import lora_linear, nf4_absmax, nf4_dequantize
from swkernels.reference.losses import (
    ce_rows_,
    distill_loss,
    distill_rows,
    linear_cross_entropy,
    linear_distill,
    topk_distill_per_token,
)
from swkernels.reference.rms_norm import rms_norm, rms_norm_backward
from swkernels.reference.rope import apply_rope, rope_cos_sin
from swkernels.reference.silu_mul import silu_mul, silu_mul_backward

__all__ = ["apply_rope", "ce_rows_", "distill_loss", "distill_rows", "linear_cross_entropy", "linear_distill",
           "gelu_mul", "gelu_mul_backward",
           "lora_linear", "nf4_absmax", "nf4_dequantize", "rms_norm", "rms_norm_backward", "rope_cos_sin", "silu_mul", "silu_mul_backward", "topk_distill_per_token"]
