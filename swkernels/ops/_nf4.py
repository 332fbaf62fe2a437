"""Reading a bitsandbytes NF4 weight (``Params4bit`` + ``QuantState``) as the fused kernels see it.

Layout (bitsandbytes 0.50; checked against ``bitsandbytes.functional.dequantize_4bit``):

* ``weight.data``: W (N, K) flattened row-major and packed two elements per byte, shape
  (⌈N·K/2⌉, 1), dtype uint8 (or another ``quant_storage`` dtype holding the same bytes). Byte
  i//2 holds element i; the even element sits in the high nibble.
* value(i) = code[nibble(i)] · absmax[i // blocksize], in fp32; ``code`` is the 16-entry NF4 table.
  Blocks run over the flat index, so with K % blocksize ≠ 0 a block straddles two rows.
* Double quantisation (``compress_statistics=True``, ``quant_state.nested``): absmax is uint8 and
  absmax[b] = state2.code[q[b]] · state2.absmax[b // state2.blocksize] + offset, state2.blocksize
  256 and state2.code bitsandbytes' 256-entry dynamic map.

Nothing here copies or dequantises W: :class:`NF4Weight` only gathers the tensors the kernels read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from swkernels import reference


class NF4Weight(NamedTuple):
    """The tensors and sizes of one NF4 weight, as the kernels read them."""

    packed: torch.Tensor  # uint8 (⌈N·K/2⌉,)
    absmax: torch.Tensor  # fp32 (blocks,), or uint8 (blocks,) when nested
    code: torch.Tensor  # fp32 (16,)
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    blocksize: int
    absmax2: torch.Tensor | None = None  # nested only: fp32 (⌈blocks/256⌉,)
    code2: torch.Tensor | None = None  # nested only: fp32 (256,)
    offset: torch.Tensor | None = None  # nested only: fp32 (1,)
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales in fp32 (the nested quantisation undone, in torch)."""
        if self.nested:
            return reference.nf4_absmax(self.absmax, self.code2, self.absmax2, self.offset, self.nested_blocksize)
        return self.absmax

    def dequantize(self) -> torch.Tensor:
        """W in fp32 (N, K), by the torch reference: for the CPU fallback, merging and tests."""
        return reference.nf4_dequantize(self.packed, self.absmax_fp32(), self.code, self.shape, self.blocksize)


def nf4_state(weight, quant_state=None) -> NF4Weight:
    """The :class:`NF4Weight` of a quantised bitsandbytes ``Params4bit`` (``Linear4bit.weight``), or
    of its packed bytes held apart from their ``quant_state`` (e.g. a packed weight that FSDP2
    gathered into a plain tensor: the quantisation state is passed beside it)."""
    qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("nf4_lora_linear: the weight has no quant_state; pass a bitsandbytes Params4bit "
                         "(Linear4bit.weight) that has been quantised")
    if qs.quant_type != "nf4":
        raise ValueError(f"nf4_lora_linear: quant_type must be 'nf4', got {qs.quant_type!r}")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("nf4_lora_linear: this weight was repacked by bitsandbytes' CPU kernels; "
                         "quantise it again (or move it with .cuda()) to get the standard NF4 layout")
    if len(qs.shape) != 2:
        raise ValueError(f"nf4_lora_linear: expected a 2-d (out, in) weight, got shape {tuple(qs.shape)}")
    packed = weight.data
    if packed.dtype != torch.uint8:  # quant_storage other than uint8: the same bytes
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    shape = (int(qs.shape[0]), int(qs.shape[1]))
    if not qs.nested:
        return NF4Weight(packed, qs.absmax.float(), qs.code.float(), shape, int(qs.blocksize))
    offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device).reshape(1)
    return NF4Weight(packed, qs.absmax, qs.code.float(), shape, int(qs.blocksize), qs.state2.absmax.float(),
                     qs.state2.code.float(), offset, int(qs.state2.blocksize))
