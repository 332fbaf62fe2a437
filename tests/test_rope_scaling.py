"""Inverse frequencies and attention factors vs transformers' own RoPE functions (the peer)."""

import copy

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from swkernels import rope_inv_freq

_LONG = [1.0 + 0.05 * i for i in range(48)]
_SHORT = [1.0 + 0.01 * i for i in range(48)]

CONFIGS = {
    "llama2-default": LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=10000.0,
                                  max_position_embeddings=4096),
    "llama3.1-llama3": LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                   max_position_embeddings=131072,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-default": MistralConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_theta=1e6,
                                     max_position_embeddings=32768),
    "qwen2-yarn": Qwen2Config(hidden_size=3584, num_attention_heads=28, rope_theta=1e6, max_position_embeddings=131072,
                              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "yarn-mscale-untruncated": LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=16384,
                                           rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                                                         "original_max_position_embeddings": 2048, "mscale": 0.707,
                                                         "mscale_all_dim": 1.0, "truncate": False}),
    "phi3-longrope": Phi3Config(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
                                original_max_position_embeddings=4096,
                                rope_scaling={"type": "longrope", "long_factor": _LONG, "short_factor": _SHORT}),
    "gemma2-default": Gemma2Config(hidden_size=2304, num_attention_heads=8, head_dim=256),
    "linear": LlamaConfig(hidden_size=1024, num_attention_heads=16, rope_scaling={"type": "linear", "factor": 4.0}),
    "dynamic": LlamaConfig(hidden_size=1024, num_attention_heads=16, max_position_embeddings=2048,
                           rope_scaling={"type": "dynamic", "factor": 4.0}),
    "partial-rotary": Phi3Config(hidden_size=3072, num_attention_heads=24, partial_rotary_factor=0.75,
                                 max_position_embeddings=4096),
}


def hf_inv_freq(config, seq_len):
    c = copy.deepcopy(config)
    c.standardize_rope_params()
    rope_type = c.rope_parameters["rope_type"]
    if rope_type == "default":  # each model's rotary class owns its default (Phi-3's handles partial rotary)
        rotary = {"phi3": Phi3RotaryEmbedding}.get(c.model_type, LlamaRotaryEmbedding)
        return rotary.compute_default_rope_parameters(c)
    return ROPE_INIT_FUNCTIONS[rope_type](c, None, seq_len=seq_len)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seq_len", [None, 1000, 5000, 9000, 200_000])
def test_inv_freq_and_attention_factor_match_transformers(name, seq_len):
    ours, ours_factor = rope_inv_freq(CONFIGS[name], seq_len)
    theirs, their_factor = hf_inv_freq(CONFIGS[name], seq_len)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert ours_factor == pytest.approx(their_factor)


def test_partial_rotary_halves_the_table():
    inv, _ = rope_inv_freq(CONFIGS["partial-rotary"])
    assert inv.numel() == int(128 * 0.75) // 2


def test_dict_inputs_legacy_and_new():
    legacy = {"hidden_size": 1024, "num_attention_heads": 16, "max_position_embeddings": 2048, "rope_theta": 10000.0,
              "rope_scaling": {"type": "linear", "factor": 2.0}}
    new = {"hidden_size": 1024, "num_attention_heads": 16, "max_position_embeddings": 2048,
           "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
    a, _ = rope_inv_freq(legacy)
    b, _ = rope_inv_freq(new)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, rope_inv_freq({**legacy, "rope_scaling": None})[0] / 2)


def test_unknown_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported rope_type"):
        rope_inv_freq({"hidden_size": 64, "num_attention_heads": 4,
                       "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}})


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_per_layer_type_parameters_match_transformers(layer_type):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = Gemma3TextConfig(hidden_size=2560, num_attention_heads=8, head_dim=256,
                              rope_scaling={"rope_type": "linear", "factor": 8.0})
    ours, ours_factor = rope_inv_freq(config, layer_type=layer_type)
    c = copy.deepcopy(config)
    rope_type = c.rope_parameters[layer_type]["rope_type"]
    init = Gemma3RotaryEmbedding.compute_default_rope_parameters if rope_type == "default" \
        else ROPE_INIT_FUNCTIONS[rope_type]
    theirs, their_factor = init(c, None, layer_type=layer_type)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert ours_factor == their_factor
    with pytest.raises(ValueError, match="per layer type"):
        rope_inv_freq(config)
    with pytest.raises(ValueError, match="leave layer_type out"):
        rope_inv_freq(CONFIGS["linear"], layer_type="full_attention")


def _small(head_dim, rope_scaling, partial=None, max_pos=8192, theta=10000.0):
    if rope_scaling is None:  # default: Phi-3's rotary class owns the partial-rotary default
        return Phi3Config(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta,
                          max_position_embeddings=max_pos, partial_rotary_factor=partial or 1.0)
    if partial is not None:
        rope_scaling = {**rope_scaling, "partial_rotary_factor": partial}
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                       max_position_embeddings=max_pos, rope_scaling=rope_scaling)


def _longrope_scaling(n, **kw):
    return {"rope_type": "longrope", "long_factor": [1.0 + 0.37 * i for i in range(n)],
            "short_factor": [1.0 + 0.013 * i for i in range(n)], "original_max_position_embeddings": 2048, **kw}


# small head dims (16, 32), partial rotary and every attention-factor branch of yarn / longrope
BITWISE_CONFIGS = {
    **CONFIGS,
    **{f"yarn-h{h}": _small(h, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048})
       for h in (16, 32, 64)},
    "yarn-h16-partial": _small(16, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024},
                               partial=0.5),
    "yarn-attention-factor": _small(32, {"rope_type": "yarn", "factor": 3.0, "attention_factor": 0.8,
                                         "beta_fast": 8, "beta_slow": 2, "original_max_position_embeddings": 2048}),
    "yarn-mscale": _small(64, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                               "original_max_position_embeddings": 4096}, max_pos=163840, theta=1e6),
    "yarn-no-factor": _small(32, {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 2048},
                             max_pos=16384),
    "yarn-untruncated-h16": _small(16, {"rope_type": "yarn", "factor": 16.0, "truncate": False,
                                        "original_max_position_embeddings": 512}),
    **{f"longrope-h{h}": _small(h, _longrope_scaling(h // 2)) for h in (16, 32)},
    "longrope-h16-partial": _small(16, _longrope_scaling(6), partial=0.75),
    "longrope-attention-factor": _small(32, _longrope_scaling(16, attention_factor=1.3, factor=4.0)),
    "llama3-h16": _small(16, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 1024}, theta=500000.0),
    "linear-h16-partial": _small(16, {"rope_type": "linear", "factor": 3.0}, partial=0.5),
    "dynamic-h16": _small(16, {"rope_type": "dynamic", "factor": 3.0}, max_pos=2048),
    "default-h16-partial": _small(16, None, partial=0.5),
}


@pytest.mark.parametrize("name", BITWISE_CONFIGS)
@pytest.mark.parametrize("seq_len", [None, 1000, 3000, 200_000])
def test_inv_freq_is_bitwise_equal_to_transformers(name, seq_len):
    """Same fp32 op order as transformers: not one ulp apart (YaRN and LongRoPE used to be)."""
    ours, ours_factor = rope_inv_freq(BITWISE_CONFIGS[name], seq_len)
    theirs, their_factor = hf_inv_freq(BITWISE_CONFIGS[name], seq_len)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    assert ours_factor == their_factor
