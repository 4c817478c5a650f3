"""Preset parameter counts against the published sizes, without allocating weights."""

import pytest

from megatron_mft.config import PRESETS

PUBLISHED = {  # parameters as published by Meta / on the HF model cards
    "codellama-7b": 6.74e9, "codellama-13b": 13.0e9, "codellama-34b": 33.7e9,
    "llama2-7b": 6.74e9, "llama2-13b": 13.0e9, "llama2-70b": 69.0e9,
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
