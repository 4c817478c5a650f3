"""MoE and Qwen3 presets: parameter counts (total, and active per token for MoE) against the
published figures, computed without allocating weights; sizes from each model's config.json."""

import pytest

from megatron_mft.config import PRESETS

#: (total, active) as published on the model cards / release posts
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9),         # Mistral AI: 46.7B total, 12.9B active
    "mixtral-8x22b": (141e9, 39e9),           # Mistral AI: 141B total, 39B active
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9),     # model card: 14.3B total, 2.7B activated
    "qwen2-57b-a14b": (57.4e9, 14e9),         # 57.4B (safetensors), "A14B"
    "qwen3-8b": (8.2e9, 8.2e9),               # model card: 8.2B
    "qwen3-32b": (32.8e9, 32.8e9),            # model card: 32.8B
    "qwen3-coder-30b-a3b": (30.5e9, 3.3e9),   # model card: 30.5B total, 3.3B activated
}
#: active figures published with two significant digits: allowed the rounding of that digit
#: (14.25B reads "A14B"; 3.35B reads "3.3B"), 1% otherwise
ACTIVE_TOL = {"qwen2-57b-a14b": 0.02, "qwen3-coder-30b-a3b": 0.02}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_preset_matches_published_sizes(name):
    total, active = PUBLISHED[name]
    arch = PRESETS[name]
    assert abs(arch.num_params() - total) / total < 0.01, (name, arch.num_params())
    assert abs(arch.num_params(active=True) - active) / active < ACTIVE_TOL.get(name, 0.01), (
        name, arch.num_params(active=True))


def test_mixtral_8x7b_by_hand():
    """One Mixtral layer: attention (GQA 8 KV heads), router, 8 SwiGLU experts, two norms."""
    h, f, kv, v = 4096, 14336, 8 * 128, 32000
    attn = 2 * h * h + 2 * h * kv
    layer = attn + 8 * h + 8 * 3 * h * f + 2 * h
    assert PRESETS["mixtral-8x7b"].num_params() == 32 * layer + 2 * v * h + h
    active = attn + 8 * h + 2 * 3 * h * f + 2 * h
    assert PRESETS["mixtral-8x7b"].num_params(active=True) == 32 * active + 2 * v * h + h


def test_family_features_of_the_moe_presets():
    p = PRESETS
    assert all(p[n].num_experts == 8 and p[n].moe_top_k == 2 and p[n].moe_norm_topk for n in ("mixtral-8x7b",
                                                                                            "mixtral-8x22b"))
    q = p["qwen3-coder-30b-a3b"]
    assert (q.num_experts, q.moe_top_k, q.expert_ffn, q.moe_norm_topk, q.qk_norm, q.head_dim, q.qkv_bias) == (
        128, 8, 768, True, True, 128, False)
    for n in ("qwen1.5-moe-a2.7b", "qwen2-57b-a14b"):
        assert p[n].qkv_bias and p[n].moe_shared_expert_gate and not p[n].moe_norm_topk
    assert p["qwen3-32b"].head_dim == 128 != p["qwen3-32b"].hidden_size // p["qwen3-32b"].num_attention_heads
    assert all(not p[n].problems() for n in PUBLISHED)
