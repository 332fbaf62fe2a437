"""Gradient accumulation weighs every label token alike (transformers' num_items_in_batch fix)."""

import pytest
import torch
from transformers import LlamaConfig

from swengine.model.build import build_training_model
from swengine.model.patch import LoraSpec
from swengine.train.step import forward_backward, label_tokens

CONFIG = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=53, max_position_embeddings=64)


def _batch(rows: int, seq: int, labelled: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 53, (rows, seq))
    labels = torch.full_like(ids, -100)
    labels[:, seq - labelled:] = ids[:, seq - labelled:]  # only the last tokens carry a loss
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq).expand(rows, seq)}


def _grads(built) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in built.params]
    for p in built.params:
        p.grad = None
    return grads


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("impl", ["swkernels", "peft"])
def test_accumulated_micro_batches_equal_one_batch_of_all_their_tokens(fused, impl):
    torch.manual_seed(0)
    built = build_training_model(CONFIG, LoraSpec(rank=4, alpha=8.0), dtype=torch.float32, device="cpu", impl=impl)
    with torch.no_grad():
        for p in built.params:
            p.normal_(std=0.2)  # B starts at zero: make every adapter contribute
    small, large = _batch(2, 12, labelled=2), _batch(2, 12, labelled=11)  # 4 vs 22 label tokens
    whole = {k: torch.cat([small[k], large[k]]) for k in small}
    num_items = label_tokens(small) + label_tokens(large)
    assert num_items == label_tokens(whole) == 2 * 2 + 2 * 11

    losses = [forward_backward(built.model, b, autocast_dtype=None, fused_loss=fused, num_items=num_items)
              for b in (small, large)]
    accumulated = _grads(built)
    one = forward_backward(built.model, whole, autocast_dtype=None, fused_loss=fused)
    expected = _grads(built)
    torch.testing.assert_close(sum(losses), one, atol=1e-6, rtol=1e-5)
    for a, b in zip(accumulated, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)

    # the mean of micro-batch means (the pre-fix behaviour) is a different gradient here
    for b in (small, large):
        forward_backward(built.model, b, autocast_dtype=None, fused_loss=fused, loss_scale=0.5)
    mean_of_means = _grads(built)
    assert max(float((a - b).abs().max()) for a, b in zip(mean_of_means, expected, strict=True)) > 1e-3
