"""Preset parameter counts against the published sizes, without allocating weights."""

import pytest

from megatron_mft.config import PRESETS

PUBLISHED = {  # parameters as published by the authors / on the HF model cards (safetensors totals)
    "codellama-7b": 6.74e9, "codellama-13b": 13.0e9, "codellama-34b": 33.7e9,
    "llama2-7b": 6.74e9, "llama2-13b": 13.0e9, "llama2-70b": 69.0e9,
    "llama3.1-8b": 8.03e9, "llama3.1-70b": 70.6e9, "llama3.2-1b": 1.24e9, "llama3.2-3b": 3.21e9,
    # Qwen2.5-Coder model cards, "Number of Parameters"
    "qwen2.5-coder-0.5b": 0.49e9, "qwen2.5-coder-1.5b": 1.54e9, "qwen2.5-coder-3b": 3.09e9,
    "qwen2.5-coder-7b": 7.61e9, "qwen2.5-coder-14b": 14.7e9, "qwen2.5-coder-32b": 32.5e9,
    "deepseek-coder-1.3b": 1.35e9, "deepseek-coder-6.7b": 6.74e9, "deepseek-coder-33b": 33.3e9,
    "mistral-7b": 7.24e9, "codestral-22b": 22.2e9,
    "starcoder2-3b": 3.03e9, "starcoder2-7b": 7.17e9, "starcoder2-15b": 15.96e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_size(name):
    got = PRESETS[name].num_params()
    assert abs(got - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, got)


def test_architecture_facts():
    cl34, l70 = PRESETS["codellama-34b"], PRESETS["llama2-70b"]
    assert (cl34.num_query_groups, l70.num_query_groups) == (8, 8)
    assert cl34.rotary_base == 1e6 and PRESETS["codellama-7b"].rotary_base == 1e6
    assert PRESETS["llama2-7b"].rotary_base == 1e4
    assert PRESETS["codellama-7b"].vocab_size == PRESETS["codellama-13b"].vocab_size == 32016
    assert cl34.vocab_size == 32000
    assert all(p.num_query_groups == p.num_attention_heads for n, p in PRESETS.items()
               if n in ("codellama-7b", "codellama-13b", "llama2-7b", "llama2-13b"))
    # CodeLlama-34B: 48 layers, hidden 8192, 64 heads, ffn 22016 (hand count of one layer)
    h, kv = 8192, 8 * 128
    layer = 2 * h * h + 2 * h * kv + 3 * h * 22016 + 2 * h
    assert cl34.num_params() == 48 * layer + 2 * 32000 * h + h


def test_family_features_of_the_presets():
    """What distinguishes each family, as its config.json states it."""
    p = PRESETS
    assert all(p[n].rope_type == "llama3" and p[n].vocab_size == 128256 and p[n].rotary_base == 5e5
               for n in ("llama3.1-8b", "llama3.1-70b", "llama3.2-1b", "llama3.2-3b"))
    assert (p["llama3.1-8b"].rope_factor, p["llama3.2-1b"].rope_factor) == (8.0, 32.0)
    assert [n for n in p if p[n].tied_embeddings] == [
        "llama3.2-1b", "llama3.2-3b", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "qwen2.5-coder-3b",
        "starcoder2-3b", "starcoder2-7b"]
    assert all(p[n].qkv_bias and not p[n].linear_bias and p[n].norm_epsilon == 1e-6 and p[n].rotary_base == 1e6
               for n in p if n.startswith("qwen2.5-coder"))
    assert all((p[n].rope_type, p[n].rope_factor, p[n].rotary_base, p[n].vocab_size) == ("linear", 4.0, 1e5, 32256)
               for n in p if n.startswith("deepseek-coder"))
    assert (p["mistral-7b"].sliding_window, p["codestral-22b"].sliding_window) == (4096, 0)
    for n in ("starcoder2-3b", "starcoder2-7b", "starcoder2-15b"):
        s = p[n]
        assert (s.normalization, s.activation, s.linear_bias, s.sliding_window) == ("LayerNorm", "gelu_tanh", True, 4096)
    # StarCoder2-15B by hand: LayerNorm weight+bias, non-gated 4h MLP, biases on every linear, untied
    h, f, kv, v = 6144, 24576, 4 * 128, 49152
    layer = (2 * h * h + 2 * h * kv) + (h + 2 * kv + h) + 2 * h * f + (f + h) + 2 * 2 * h
    assert p["starcoder2-15b"].num_params() == 40 * layer + 2 * v * h + 2 * h
