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
