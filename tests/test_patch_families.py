"""The patched model (every swkernels op swapped in) equals the transformers model, family by family.

Tiny random configs of each supported family, run through the Triton interpreter on CPU (the GPU
code path): logits and input gradients of ``patch(model)`` vs the untouched model; with LoRA,
logits and adapter gradients vs PEFT holding the same adapter weights; and a training step
dispatches every fused op (checked with a TorchDispatchMode).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from swengine.errors import UserError
from swengine.model.attention import implementation_for
from swengine.model.fused_attention import FusedAttention
from swengine.model.fused_mlp import FusedMLP
from swengine.model.patch import LoraSpec, patch
from swkernels.nn import RMSNorm, RotaryEmbedding
from tests.utils import config_classes

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, max_position_embeddings=128)
_C = config_classes()
CONFIGS = {
    "llama": lambda: _C["llama"](**TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: _C["mistral"](**TINY, sliding_window=8),
    "qwen2": lambda: _C["qwen2"](**TINY, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32}),
    "qwen3": lambda: _C["qwen3"](**TINY, head_dim=16),
    "phi3": lambda: _C["phi3"](**TINY, partial_rotary_factor=0.5, pad_token_id=0),
    "gemma2": lambda: _C["gemma2"](**TINY, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": lambda: _C["gemma3"](**TINY, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                       rope_local_base_freq=100.0,
                                       layer_types=["sliding_attention", "full_attention"]),
}


def build(family: str, dtype=torch.float32) -> torch.nn.Module:
    config = CONFIGS[family]()
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=implementation_for(config))
    for name, p in model.named_parameters():  # norms start at 1 (or 0 for Gemma): perturb them
        if "norm" in name:
            p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _grads(model, ids, positions):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, position_ids=positions).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), embeds.grad


@pytest.mark.parametrize("family", CONFIGS)
def test_patched_model_equals_transformers(family):
    reference = build(family)
    ours = copy.deepcopy(reference)
    handle = patch(ours, lora=None)
    assert not handle.kept, handle.kept
    layers = ours.model.layers
    assert all(isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP) for layer in layers)
    assert isinstance(ours.model.norm, RMSNorm) and isinstance(layers[0].input_layernorm, RMSNorm)
    assert isinstance(ours.model.rotary_emb, RotaryEmbedding) and ours.model.rotary_emb.fused
    ids = torch.randint(0, 97, (2, 19))
    positions = torch.tensor([list(range(19)), list(range(7)) + list(range(12))])  # packed second row
    want_logits, want_grad = _grads(reference, ids, positions)
    got_logits, got_grad = _grads(ours, ids, positions)
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=2e-5, rtol=2e-5)
    handle.undo()
    assert type(ours.model.layers[0].self_attn) is type(reference.model.layers[0].self_attn)
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_patched_model_in_bf16_is_as_accurate_as_transformers(family):
    """bf16 results differ from any other bf16 implementation by rounding; the fair test is the
    distance to the fp32 truth (the same bf16 weights, computed in fp32): ours must be as close
    to it as transformers' own bf16 model is."""
    reference = build(family, torch.bfloat16)
    ours = copy.deepcopy(reference)
    patch(ours, lora=None)
    truth = copy.deepcopy(reference).float()
    ids = torch.randint(0, 97, (2, 13))
    positions = torch.arange(13).expand(2, 13)
    exact = _grads(truth, ids, positions)

    def error(model):
        return [float((got.float() - want).norm() / want.norm()) for got, want in zip(_grads(model, ids, positions),
                                                                                      exact, strict=True)]

    theirs, mine = error(reference), error(ours)
    for name, a, b in zip(("logits", "input grad"), mine, theirs, strict=True):
        assert a <= 1.5 * b + 2e-3, f"{name}: ours {a:.4f} vs transformers {b:.4f} relative error to fp32"


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma2"])
def test_lora_patched_model_equals_peft(family):
    from peft import LoraConfig, get_peft_model

    from swengine.model.patch import resolve_targets

    base = build(family)
    ours = copy.deepcopy(base)
    spec = LoraSpec(rank=4, alpha=8.0)
    handle = patch(ours, spec)
    targets = list(resolve_targets(ours, spec.targets))
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8.0, target_modules=targets))
    peft_lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for path, layer in handle.lora.items():
            layer.lora_B.weight.normal_(std=0.1)
            peft_lora[f"base_model.model.{path}.lora_A.default.weight"].copy_(layer.lora_A.weight)
            peft_lora[f"base_model.model.{path}.lora_B.default.weight"].copy_(layer.lora_B.weight)
    ids = torch.randint(0, 97, (2, 11))
    ours_logits = ours(ids).logits
    peft_logits = peft(ids).logits
    torch.testing.assert_close(ours_logits, peft_logits, atol=2e-5, rtol=2e-5)
    ours_logits.square().mean().backward()
    peft_logits.square().mean().backward()
    for path, layer in handle.lora.items():
        torch.testing.assert_close(layer.lora_A.weight.grad,
                                   peft_lora[f"base_model.model.{path}.lora_A.default.weight"].grad,
                                   atol=1e-5, rtol=1e-4)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_training_step_of_the_demo_model_dispatches_every_fused_op():
    from swengine.model.build import build_training_model
    from swengine.model.load import DEMO_MODEL, load_config
    from swengine.train.step import forward_backward

    config = load_config(str(DEMO_MODEL), 64, {})
    # LoRA on one projection: each interpreted GEMM costs ~0.1 s, and one is enough to see the op
    built = build_training_model(config, LoraSpec(rank=4, alpha=8.0, targets=("v_proj",)), dtype=torch.float32,
                                 device="cpu", weights=str(DEMO_MODEL))
    ids = torch.randint(3, 500, (1, 8))  # the interpreter runs every program in Python: keep it small
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(8)[None]}
    with _Ops() as ops:
        forward_backward(built.model, batch, autocast_dtype=None, fused_loss=True, num_items=7)
    wanted = {"swkernels.rope", "swkernels.silu_mul", "swkernels.silu_mul_backward", "swkernels.rms_norm",
              "swkernels.lora_linear_fwd", "swkernels.lora_linear_bwd", "swkernels.fused_linear_ce_fwd"}
    assert wanted <= ops.seen, wanted - ops.seen
    assert any(op.startswith("swkernels.rms_norm") and "backward" in op for op in ops.seen), sorted(ops.seen)
    assert all(p.grad is not None for p in built.params)


def test_an_unknown_layout_warns_once_or_fails_when_strict(caplog):
    model = build("llama")
    model.config.hidden_act = "relu"  # no fused relu·mul kernel: the MLP keeps transformers' module
    with caplog.at_level(logging.WARNING, logger="swengine"):
        handle = patch(copy.deepcopy(model), LoraSpec(rank=2, alpha=4.0))
    assert handle.kept == ["mlp (activation 'relu' has no fused kernel)"]
    [record] = [r for r in caplog.records if r.name == "swengine"]
    assert "kept the transformers path for mlp (activation 'relu'" in record.getMessage()
    with pytest.raises(UserError, match="--strict-kernels"):
        patch(model, LoraSpec(rank=2, alpha=4.0), strict=True)
    assert not any(isinstance(m, (FusedMLP, FusedAttention)) for m in model.modules())  # undone on failure
