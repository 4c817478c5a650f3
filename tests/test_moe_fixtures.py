"""Helpers for the MoE family tests (no tests here): tiny random Mixtral, Qwen2-MoE, Qwen3-MoE
and Qwen3 models built with transformers' own classes. Each keeps its family's features: GQA;
Mixtral top-2 with renormalised probabilities; Qwen2-MoE QKV bias, top-k without
renormalisation and a sigmoid-gated shared expert; Qwen3 QK-norm and an explicit head_dim
that is not hidden/heads; Qwen3-MoE 8 experts top-4 renormalised. Logit comparisons reuse
tests/test_families_fixtures.py (same vocabulary, sequences and packing)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from test_families_fixtures import VOCAB

_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)

MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        _SIZES, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        _SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        _SIZES, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32, head_dim=32, norm_topk_prob=True,
        rms_norm_eps=1e-6, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SIZES, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6)),
}
MOE_FAMILIES = tuple(MOE_CONFIGS)


def make_moe_model(name: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random fp32 model saved with ``save_pretrained`` (several shards); router weights large
    enough that the top-k choice is clear-cut (no near ties for float error to flip)."""
    import transformers

    cfg_cls, model_cls, kwargs = MOE_CONFIGS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**kwargs, **overrides})).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lm_head" in pname:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif pname.endswith("mlp.gate.weight") or pname.endswith("block_sparse_moe.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, max_shard_size="60KB")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, "test_marker": name}))
    return out


def make_all_moe(root: Path) -> dict[str, Path]:
    return {name: make_moe_model(name, root / name) for name in MOE_FAMILIES}


def moe_cli_overrides(name: str, root: Path, demo_data, seed: int, steps: int) -> list[str]:
    """CLI overrides that train a tiny random ``name`` MoE (saved under ``root/hf``, vocabulary
    2048) on the demo data: the model section read off its config.json plus the data and step keys."""
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, model_section, read_hf_config

    hf = make_moe_model(name, root / "hf", seed=seed, vocab_size=2048)
    model = model_section(model_config_from_hf(read_hf_config(hf)))
    return [f"model.{k}={v}" for k, v in model.items()] + [
        f"model.hf_init={hf}", "data.source=offline", f"data.path={demo_data}", "data.seq_length=512",
        f"train.steps={steps}", "train.eval_interval=0", "train.save_interval=0", "train.global_batch_size=4"]
