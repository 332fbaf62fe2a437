"""The knobs of a training step that decide its memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from swengine.errors import UserError
from swengine.model.build import QUANTS  # the base-weight formats the one model builder makes

ALL_LINEAR = ("all-linear",)  # every projection of a decoder layer (not the LM head)
LORA_IMPLS = ("peft", "swkernels")
LOSSES = ("unfused", "fused")
ATTENTIONS = ("sdpa", "eager")
DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class Teacher:
    """A frozen distillation teacher run alongside the student (online distillation)."""

    model: str
    quant: str = "none"


@dataclass(frozen=True)
class Setup:
    seq_len: int
    micro_batch: int = 1
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    quant: str = "none"  # base weights: bf16/fp16, or bitsandbytes NF4 (nf4-dq: with double quant)
    checkpointing: bool = True  # per decoder layer
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit
    lora_impl: str = "peft"  # peft (fp32 adapters) | swkernels (fused kernels)
    loss: str = "unfused"  # unfused: transformers' upcast logits; fused: chunked linear + CE
    attention: str = "sdpa"
    dtype: str = "bf16"
    teacher: Teacher | None = None
    shard_world: int = 1  # FSDP2: ranks the decoder's weights, the adapter and its optimizer states are sharded over

    def __post_init__(self):
        from swengine.train.optim import OPTIMIZERS

        for name, value, allowed in (("quant", self.quant, QUANTS), ("lora_impl", self.lora_impl, LORA_IMPLS),
                                     ("loss", self.loss, LOSSES), ("attention", self.attention, ATTENTIONS),
                                     ("dtype", self.dtype, DTYPES), ("optimizer", self.optimizer, OPTIMIZERS)):
            if value not in allowed:
                raise UserError(f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}")
        if self.seq_len < 1 or self.micro_batch < 1:
            raise UserError(f"seq_len and micro_batch must be >= 1 (got {self.seq_len}, {self.micro_batch})")
        if self.lora_rank < 1:
            raise UserError(f"LoRA rank must be >= 1 (got {self.lora_rank})")
        if self.shard_world < 1:
            raise UserError(f"shard_world must be >= 1 (got {self.shard_world})")

    def with_(self, **changes) -> Setup:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch
