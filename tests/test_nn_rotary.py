"""RotaryEmbedding as a drop-in for transformers' rotary modules, and the dynamic-NTK behaviour."""

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from swkernels.nn import RotaryEmbedding, replace_rotary
from swkernels.rope_scaling import rope_inv_freq

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=101, max_position_embeddings=256)
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def llama(scaling):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, rope_scaling=copy.deepcopy(scaling))).eval()


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("seq", [37, 300])  # below and above max_position_embeddings
def test_cos_sin_match_transformers_rotary_module(name, seq):
    config = LlamaConfig(**TINY, rope_scaling=copy.deepcopy(SCALINGS[name]))
    theirs, ours = LlamaRotaryEmbedding(config), RotaryEmbedding(config)
    x = torch.randn(2, seq, 64, dtype=torch.bfloat16)
    pos = torch.arange(seq).repeat(2, 1)
    for a, b in zip(ours(x, pos), theirs(x, pos), strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("name", SCALINGS)
def test_patched_tiny_llama_gives_the_same_logits(name):
    model = llama(SCALINGS[name])
    ids = torch.randint(0, 101, (2, 300 if name == "dynamic" else 61))
    with torch.no_grad():
        before = model(ids).logits
        assert replace_rotary(model) == 1
        after = model(ids).logits
    assert isinstance(model.model.rotary_emb, RotaryEmbedding)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def _qwen2_yarn():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**TINY, rope_scaling={"type": "yarn", "factor": 2.0,
                                                             "original_max_position_embeddings": 128})).eval()


def _phi3_longrope():
    torch.manual_seed(0)
    half = 64 // 4 // 2
    return Phi3ForCausalLM(Phi3Config(**{**TINY, "num_key_value_heads": 4}, original_max_position_embeddings=64,
                                      pad_token_id=0, rope_scaling={"type": "longrope",
                                                                    "long_factor": [1.0 + i for i in range(half)],
                                                                    "short_factor": [1.0] * half})).eval()


@pytest.mark.parametrize("factory,seq", [(_qwen2_yarn, 40), (_phi3_longrope, 40), (_phi3_longrope, 100)],
                         ids=["qwen2-yarn", "phi3-longrope-short", "phi3-longrope-long"])
def test_patched_qwen2_and_phi3(factory, seq):
    model = factory()
    ids = torch.randint(0, 101, (1, seq))
    with torch.no_grad():
        before = model(ids).logits
        assert replace_rotary(model) == 1
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert replace_rotary(model) == 0  # our module is not replaced again


def test_dynamic_ntk_depends_only_on_the_current_length():
    config = LlamaConfig(**TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    rotary = RotaryEmbedding(config)
    x = torch.randn(1, 1, 64)
    fresh_500 = rotary.inv_freq_for(500)[0].clone()
    rotary(x, torch.arange(900)[None])  # a long sequence first
    assert torch.equal(rotary.inv_freq_for(500)[0], fresh_500)  # no memory of the 900-token batch
    assert torch.equal(rotary.inv_freq_for(100)[0], rope_inv_freq(config)[0])  # back to the original below 256
    assert not torch.equal(rotary.inv_freq_for(900)[0], fresh_500)  # and it grows with the sequence

    # transformers' module keeps the 900-token frequencies for a 500-token batch (the known pitfall)
    theirs = LlamaRotaryEmbedding(config)
    theirs(x, torch.arange(900)[None])
    theirs(x, torch.arange(500)[None])
    assert not torch.allclose(theirs.inv_freq, fresh_500)


@pytest.mark.parametrize("name,seq", [("yarn", 37), ("dynamic", 300), ("llama3", 37), ("longrope", 30),
                                      ("longrope", 80)])
def test_fused_kernel_path_matches_transformers_attention_inputs(name, seq):
    """inv_freq_for + attention_factor fed to the kernel rotate q/k like transformers' rotary module
    + apply_rotary_pos_emb (attention factor ≠ 1 for YaRN and LongRoPE)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    import swkernels

    if name == "longrope":
        half = 64 // 4 // 2
        config = Phi3Config(**TINY, original_max_position_embeddings=64, rope_scaling={
            "type": "longrope", "long_factor": [1.0 + i for i in range(half)], "short_factor": [1.5] * half})
        theirs = Phi3RotaryEmbedding(config)
    else:
        config = LlamaConfig(**TINY, rope_scaling=copy.deepcopy(SCALINGS[name]))
        theirs = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(config)
    q = torch.randn(2, seq, 4, 16).transpose(1, 2)
    k = torch.randn(2, seq, 2, 16).transpose(1, 2)
    pos = torch.arange(seq).repeat(2, 1)
    cos, sin = theirs(q, pos)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    inv, factor = ours.inv_freq_for(seq)
    assert factor == ours.attention_factor == pytest.approx(theirs.attention_scaling)
    got = swkernels.apply_rope(q, k, pos, inv, factor)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _gemma3(full_attention_scaling):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(**{**TINY, "num_hidden_layers": 3}, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              rope_scaling=full_attention_scaling)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 8.0}], ids=["default", "linear"])
def test_per_layer_type_rope_gemma3(scaling):
    """Gemma 3 keeps RoPE parameters per layer type (local θ=10K, global θ=1M, scaled)."""
    model = _gemma3(scaling)
    ids = torch.randint(0, 101, (1, 29))
    with torch.no_grad():
        before = model(ids).logits
        assert replace_rotary(model) == 1
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    rotary = model.model.rotary_emb
    assert isinstance(rotary, RotaryEmbedding)
    assert rotary.layer_types == ["full_attention", "sliding_attention"]
    full, _ = rotary.inv_freq_for(29, "full_attention")
    local, _ = rotary.inv_freq_for(29, "sliding_attention")
    assert not torch.equal(full, local)
    torch.testing.assert_close(local, rope_inv_freq(model.config, layer_type="sliding_attention")[0])
    with pytest.raises(ValueError, match="layer_type"):
        rotary.inv_freq_for(29)


def test_rotary_modules_with_other_conventions_are_kept(caplog):
    """A module named like a rotary embedding but returning something else (e.g. interleaved
    pairs, 3-D multimodal positions) fails the probe and stays."""
    config = LlamaConfig(**TINY)

    class InterleavedRotaryEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.register_buffer("inv_freq", rope_inv_freq(config)[0], persistent=False)

        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * self.inv_freq
            emb = freqs.repeat_interleave(2, dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    holder = torch.nn.ModuleDict({"rotary_emb": InterleavedRotaryEmbedding(),
                                  "llama_rotary": LlamaRotaryEmbedding(config)})
    with caplog.at_level("WARNING", logger="swkernels"):
        assert replace_rotary(holder) == 1
    assert isinstance(holder["llama_rotary"], RotaryEmbedding)
    assert isinstance(holder["rotary_emb"], InterleavedRotaryEmbedding)
    assert "differ" in caplog.text


def test_replace_on_the_meta_device_skips_the_probe():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    assert replace_rotary(model) == 1
    assert model.model.rotary_emb.inv_freq.device.type == "meta"
