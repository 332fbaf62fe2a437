"""The distillation teacher: loaded frozen, patched with our fused ops (no LoRA), in eval mode;
and the vocabulary check between student and teacher.

Logit distillation compares the two models token by token, so both must use the same tokenizer.
That is checked on the vocabularies themselves (token → id maps, added and special tokens
included), never on model names. The LM heads may still differ in rows: vocabularies are padded
to a multiple of 64/128 (Qwen2.5: 151,936 rows in the small models, 152,064 in the 7B+ ones for
the same 151,665 tokens); the loss then runs over the tokenizer's ids only.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from swengine.errors import UserError
from swengine.model.build import QUANTS

SAME_FAMILY = ("logit distillation needs the student's tokenizer: choose a teacher of the student's model family "
               "(same vocabulary)")


def load_teacher(path: str, *, dtype: torch.dtype, device: str | torch.device, quant: str = "none",
                 attention: str = "sdpa", max_seq_len: int = 0, rope_scaling: dict | None = None) -> nn.Module:
    """The frozen teacher (``distill.teacher``): a local model directory or hub id, loaded in
    ``dtype`` (``quant``: none | nf4 | nf4-dq, i.e. ``distill.teacher_4bit``), patched with our
    fused RoPE/attention/MLP/RMSNorm kernels and no adapters, every parameter with
    ``requires_grad=False``, in eval mode. Call it under ``torch.no_grad()``.
    ``max_seq_len``/``rope_scaling``: as for the student (0: no length check)."""
    from swengine.model import load as model_load
    from swengine.model.patch import patch

    if not path:
        raise UserError("distill.teacher is empty; set distill.teacher=<model directory or hub id> (or distill.cache)")
    if quant not in QUANTS:
        raise UserError(f"teacher quantisation must be one of {', '.join(QUANTS)} (got {quant!r})")
    loadable = model_load.model_path(path)
    try:
        config = model_load.load_config(loadable, max_seq_len, rope_scaling or {})
        model = model_load.load_model(loadable, config, dtype, torch.device(device), attention, quant != "none",
                                      quant == "nf4-dq")
    except UserError as exc:
        raise UserError(f"distill.teacher: {exc}") from None
    patch(model, None, kernels=True)  # freezes every parameter; swaps in our fused ops
    model.requires_grad_(False)
    model.eval()
    return model


def vocabulary(tokenizer) -> dict[str, int]:
    """token → id, added tokens included."""
    return dict(tokenizer.get_vocab())


def vocab_size(tokenizer) -> int:
    """The number of logits that carry a token: the largest id + 1."""
    vocab = vocabulary(tokenizer)
    return max(vocab.values()) + 1 if vocab else 0


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary (sorted token → id pairs) and the special-token roles: what the
    offline cache records so that a different tokenizer is refused."""
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    blob = json.dumps({"vocab": sorted(vocabulary(tokenizer).items()), "special": special},
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _describe_difference(a: dict[str, int], b: dict[str, int]) -> str:
    by_id_a = {i: t for t, i in a.items()}
    by_id_b = {i: t for t, i in b.items()}
    ids = sorted(set(by_id_a) | set(by_id_b))
    differing = [i for i in ids if by_id_a.get(i) != by_id_b.get(i)]
    first = differing[0]
    return (f"{len(a)} vs {len(b)} tokens, {len(differing)} ids differ, e.g. id {first}: "
            f"{by_id_a.get(first, '<none>')!r} vs {by_id_b.get(first, '<none>')!r}")


def check_vocab(student_tokenizer, teacher_tokenizer, student_vocab_rows: int, teacher_vocab_rows: int) -> int:
    """The shared real vocabulary size to distil over (``vocab_size`` of
    :func:`swkernels.fused_linear_distill`), or a one-line :class:`UserError`.

    The tokenizers must have identical vocabularies (token → id, added tokens included); the
    special-token roles may differ (an instruct teacher ends turns with another token than its base
    student). LM heads padded past the vocabulary (151,936 vs 152,064 rows) are fine: the loss runs
    over the tokenizer's ids; a head with fewer rows than the tokenizer has ids is an error."""
    s_vocab, t_vocab = vocabulary(student_tokenizer), vocabulary(teacher_tokenizer)
    if s_vocab != t_vocab:
        raise UserError(f"distill.teacher uses another tokenizer than the student ({_describe_difference(s_vocab, t_vocab)}); "
                        f"{SAME_FAMILY}")
    size = vocab_size(student_tokenizer)
    for who, rows in (("student", student_vocab_rows), ("teacher", teacher_vocab_rows)):
        if rows is not None and rows < size:
            raise UserError(f"the {who}'s LM head has {rows} rows but its tokenizer has {size} token ids (added "
                            f"tokens without resized embeddings?); resize the {who}'s embeddings to the tokenizer, "
                            "or use a checkpoint saved with them")
    return size


def lm_head(model: nn.Module, who: str = "student") -> nn.Module:
    """The output embedding of a causal LM (inside a PEFT wrapper too), checked for what the fused
    distillation loss supports: no bias, no final logit soft-cap (Gemma-2)."""
    from swengine.train.step import _causal_lm

    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if getattr(lm.config, "final_logit_softcapping", None):
        raise UserError(f"the {who} soft-caps its logits (final_logit_softcapping, Gemma-2); distillation does not "
                        "support soft-capped logits yet; choose another model family")
    if getattr(head, "bias", None) is not None:
        raise UserError(f"the {who}'s LM head has a bias; distillation supports bias-free LM heads only")
    return head
