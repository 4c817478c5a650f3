"""MoE families on one process (gloo, world size 1, fp32, CPU): megatron's MoE layer (router,
token dispatcher, SequentialMLP experts, shared expert) gives transformers' logits for tiny
Mixtral, Qwen2-MoE, Qwen3-MoE and Qwen3 models (unpacked rows and packed samples); hf -> mcore
-> hf is bit-exact and loads with the family's class. EP=2: tests/test_moe_parallel.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from test_families_fixtures import TOL, parity
from test_hf_fixtures import hf_state
from test_moe_fixtures import MOE_CONFIGS, MOE_FAMILIES, make_all_moe


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    return make_all_moe(tmp_path_factory.mktemp("moe"))


def _hf_init_chunks(env, hf_dir: Path):
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.config import ParallelConfig
    from megatron_mft.model import build_model_chunks

    cfg = dataclasses.replace(model_config_from_hf(read_hf_config(hf_dir)), precision="fp32")
    chunks = build_model_chunks(cfg, ParallelConfig(), env)
    load_hf_into_chunks(hf_dir, chunks, cfg, ParallelConfig())
    return chunks, cfg


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_logits_equal_transformers_unpacked_and_packed(tp1_env, moe_models, name):
    chunks, cfg = _hf_init_chunks(tp1_env, moe_models[name])
    assert cfg.arch().family == name
    rows, packed = parity(chunks, moe_models[name])
    assert rows <= TOL and packed <= TOL, (name, rows, packed)


def test_family_features_reach_megatron(tp1_env, moe_models):
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config

    arch = {n: model_config_from_hf(read_hf_config(moe_models[n])).arch() for n in MOE_FAMILIES}
    m, q2, q3, d = arch["mixtral"], arch["qwen2_moe"], arch["qwen3_moe"], arch["qwen3"]
    assert (m.num_experts, m.moe_top_k, m.expert_ffn, m.moe_norm_topk) == (4, 2, 96, True)
    assert (q2.num_experts, q2.moe_top_k, q2.expert_ffn, q2.moe_norm_topk, q2.qkv_bias) == (4, 2, 32, False, True)
    assert (q2.moe_shared_expert_size, q2.moe_shared_expert_gate) == (48, True)
    assert (q3.num_experts, q3.moe_top_k, q3.moe_norm_topk, q3.qk_norm, q3.head_dim) == (8, 4, True, True, 32)
    assert (d.num_experts, d.qk_norm, d.head_dim) == (0, True, 32)
    chunks, _ = _hf_init_chunks(tp1_env, moe_models["qwen2_moe"])
    cfg = chunks[0].config
    assert cfg.moe_router_pre_softmax and cfg.moe_shared_expert_gate and cfg.num_moe_experts == 4


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_round_trip_is_bit_exact_and_loads_with_the_family_class(tp1_env, moe_models, tmp_path, name):
    import transformers

    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf

    src = moe_models[name]
    convert_hf_to_mcore(src, tmp_path / "ckpt", log=lambda s: None)
    export_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="60KB", log=lambda s: None)
    a, b = hf_state(src), hf_state(tmp_path / "back")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((src / "config.json").read_text())
    cb = json.loads((tmp_path / "back" / "config.json").read_text())
    if ca.get("head_dim") is None:  # Mixtral leaves it null (= hidden/heads); export writes it out
        ca["head_dim"] = ca["hidden_size"] // ca["num_attention_heads"]
    for key in set(ca) - {"transformers_version", "dtype", "torch_dtype"}:
        assert cb.get(key) == ca[key], (name, key, ca[key], cb.get(key))
    model = getattr(transformers, MOE_CONFIGS[name][1]).from_pretrained(str(tmp_path / "back"))
    assert type(model).__name__ == MOE_CONFIGS[name][1]
