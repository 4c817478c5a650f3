"""LoRA / QLoRA on mixture-of-experts models (issue 16): per-expert adapters on megatron's
SequentialMLP experts, the shared expert and attention; the router frozen.

* one process: the tiny Mixtral and Qwen2-MoE (shared expert with its gate) with non-zero
  adapters give the logits of transformers' class with the exported peft adapter
  (``target_parameters`` on the fused 3-D experts) and of the merged export;
* QLoRA: every expert's base weight is NF4 and dequantises to the float64 NF4 reference; a few
  optimizer steps lower the loss and move only adapters;
* torchrun (EP=2, Qwen2-MoE): the LoRA model's logits equal transformers' merged model (the
  adapter checkpoint saved at EP=2, exported), each EP rank holds only its experts' adapters, the
  trainable count is the hand count. LoRA training through the CLI at EP=2 equals EP=1 step for
  step (loss, router loss, expert load): test_moe_train, whose launches run it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from test_families_fixtures import TOL, VOCAB, tokens
from test_moe_fixtures import make_moe_model
from train_helpers import ROOT, env, torchrun

PEFT_FAMILIES = ("mixtral", "qwen2_moe")


def build_lora_moe(env_, hf: Path, method: str, seed: int = 3, rank: int = 4):
    """(chunks, model config, peft config, plan) of a LoRA/QLoRA MoE model on ``hf``'s weights."""
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.config import ParallelConfig, PeftConfig
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan

    model = dataclasses.replace(model_config_from_hf(read_hf_config(hf)), precision="fp32", hf_init=str(hf))
    peft = PeftConfig(method=method, rank=rank, alpha=2.0 * rank)
    plan = PeftPlan(peft, env_, seed=seed)
    chunks = build_model_chunks(model, ParallelConfig(), env_, layer=plan.layer_spec(model))
    load_hf_into_chunks(hf, chunks, model, ParallelConfig())
    plan.prepare(chunks)
    return chunks, model, peft, plan


def randomise_b(chunks, seed: int = 17, std: float = 0.3) -> None:
    from megatron_mft.peft import iter_adapters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in iter_adapters(chunks):
            m.lora_B.weight.normal_(0.0, std, generator=g)


def expected_adapters(arch, model) -> int:
    """Adapter modules of a MoE model: qkv, proj, and fc1/fc2 per routed expert (+ shared)."""
    return arch.num_layers * (2 + 2 * arch.num_experts + (2 if arch.moe_shared_expert_size else 0))


@pytest.mark.parametrize("name", PEFT_FAMILIES)
def test_lora_on_experts_exports_to_peft_and_merged(tp1_env, tmp_path, name):
    from megatron_mft.checkpoint.dist import save_checkpoint
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.checkpoint.hf.verify import hf_logits, megatron_logits
    from megatron_mft.config import RunConfig
    from megatron_mft.config.base import to_dict
    from megatron_mft.peft import global_adapter_names

    hf = make_moe_model(name, tmp_path / "hf", seed=3)
    chunks, model, peft, plan = build_lora_moe(tp1_env, hf, "lora")
    arch = model.arch()
    names = [n for n, _ in global_adapter_names(chunks[0])]
    assert len(names) == expected_adapters(arch, model)
    assert f"decoder.layers.1.mlp.experts.{arch.num_experts - 1}.linear_fc2" in names
    from megatron_mft.peft import lora_params

    assert plan.counts["trainable"] == lora_params(arch, 4, peft.target_modules)
    trainable = {n for n, p in chunks[0].named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    routers = [p for n, p in chunks[0].named_parameters() if ".mlp.router." in n]
    assert len(routers) == arch.num_layers and not any(p.requires_grad for p in routers)  # router frozen
    randomise_b(chunks)
    toks = tokens()
    lora = megatron_logits(chunks, toks, VOCAB)
    base = hf_logits(hf, toks)
    assert (base - lora).abs().max() > 0.05  # the adapters matter
    # the expert adapters alone matter too: switching them off moves the logits
    from megatron_mft.peft import iter_adapters

    experts = [m for n, m in iter_adapters(chunks) if ".local_experts." in n]
    for m in experts:
        m.disabled = True
    no_expert = megatron_logits(chunks, toks, VOCAB)
    for m in experts:
        m.disabled = False
    assert (no_expert - lora).abs().max() > 0.05

    run = RunConfig(model=model, peft=peft, output_dir=str(tmp_path / "run"))
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, chunks, None, common={"step": 1},
                    run_info={"config": to_dict(run), "peft": "lora"}, trainable_only=True)
    export_to_hf(tmp_path / "run", tmp_path / "adapter", adapter_only=True, log=lambda s: None)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    shared = ["down_proj", "gate_proj", "up_proj"] if arch.moe_shared_expert_size else []
    assert cfg["target_modules"] == sorted(["k_proj", "o_proj", "q_proj", "v_proj"] + shared)
    with_peft = hf_logits(hf, toks, adapter=tmp_path / "adapter")
    assert (with_peft - lora).abs().max() <= TOL, name

    export_to_hf(tmp_path / "run", tmp_path / "merged", merge_lora=True, log=lambda s: None)
    assert (hf_logits(tmp_path / "merged", toks) - lora).abs().max() <= TOL, name


def test_grouped_gemm_experts_are_refused_by_name():
    """TE's grouped GEMM (TEGroupedMLP) holds all local experts in one GroupedLinear: not wrapped;
    PEFT builds the local spec (SequentialMLP) instead, and a TE spec handed to it is refused."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from megatron_mft.config import PeftConfig
    from megatron_mft.peft import adapter_spec

    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    spec.submodules.mlp.submodules.experts.module = TEGroupedMLP
    with pytest.raises(TypeError, match="TEGroupedMLP.*grouped GEMM"):
        adapter_spec(spec, PeftConfig(method="lora"), quantize=False)
    adapter_spec(spec, PeftConfig(method="lora", target_modules=["linear_qkv"]), quantize=False)


def test_qlora_experts_are_nf4_and_train(tp1_env, tmp_path):
    """Every routed and shared expert linear holds NF4 codes that dequantise to the float64 NF4
    reference of its HF weight; four Adam steps on a fixed batch lower the loss and change only
    adapters (base, router and NF4 codes untouched)."""
    from megatron_mft.peft import NF4Weight, iter_adapters

    hf = make_moe_model("qwen2_moe", tmp_path / "hf", seed=4)
    chunks, model, _, plan = build_lora_moe(tp1_env, hf, "qlora", rank=8)
    arch = model.arch()
    from safetensors.torch import load_file

    hf_state = {}
    for f in sorted(hf.glob("*.safetensors")):
        hf_state.update(load_file(str(f)))
    seen = 0
    for name, m in iter_adapters(chunks):
        assert isinstance(m.weight, NF4Weight), name
        if ".local_experts.0.linear_fc2" in name and name.startswith("decoder.layers.0."):
            dense = hf_state["model.layers.0.mlp.experts.0.down_proj.weight"]
            ref = nf4_reference(dense)
            got = m.weight.dequantize(torch.float32).double()
            off = (got - ref).abs() > 1e-5 * ref.abs().max()
            assert off.sum() <= max(1, dense.numel() // 1000), (name, int(off.sum()))  # float32 ties only
            rel = ((got - dense.double()).norm() / dense.double().norm()).item()
            assert 0.05 < rel < 0.11, rel
            seen += 1
    assert seen == 1
    assert plan.counts["nf4"] == arch.num_layers * (
        arch.num_experts * 3 * arch.hidden_size * arch.expert_ffn + 3 * arch.hidden_size * arch.moe_shared_expert_size
        + sum(i * o for i, o in _attn_shapes(arch)))

    (model_chunk,) = chunks
    model_chunk.train()
    before = {n: p.detach().clone() for n, p in model_chunk.named_parameters()}
    codes = {n: m.weight.packed.clone() for n, m in iter_adapters(chunks)}
    params = [p for p in model_chunk.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    toks = tokens(seed=5)
    pos = torch.arange(toks.shape[1])[None].expand_as(toks)
    labels = torch.roll(toks, -1, dims=1)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model_chunk(input_ids=toks, position_ids=pos, attention_mask=None, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model_chunk.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (".lora_A" in n or ".lora_B" in n), n
    assert all(torch.equal(codes[n], m.weight.packed) for n, m in iter_adapters(chunks))


def nf4_reference(dense: torch.Tensor) -> torch.Tensor:
    """Float64 NF4 + double quantisation from the papers' definitions (tests/test_nf4_reference.py's
    levels and dynamic map): blocks of 64 scaled by absmax, nearest NF4 level; absmax values minus
    their mean in blocks of 256, nearest value of the 8-bit dynamic map; dequantised."""
    import numpy as np

    from test_nf4_reference import blocks, dynamic_map, nearest, nf4_levels

    x = dense.double().reshape(-1).numpy()
    n = x.size
    levels, dmap = nf4_levels(), dynamic_map()
    absmax = np.array([np.abs(b).max() for b in blocks(x, 64)])
    idx, _ = nearest(x / np.repeat(np.where(absmax > 0, absmax, 1.0), 64)[:n], levels)
    offset = absmax.mean()
    absmax2 = np.array([np.abs(b).max() for b in blocks(absmax - offset, 256)])
    scale2 = np.repeat(absmax2, 256)[: absmax.size]
    q8, _ = nearest((absmax - offset) / scale2, dmap)
    block_scale = dmap[q8] * scale2 + offset
    return torch.from_numpy(levels[idx] * np.repeat(block_scale, 64)[:n]).reshape(dense.shape)


def _attn_shapes(arch):
    from megatron_mft.peft.memory import target_shapes

    shapes = target_shapes(arch)
    return [shapes["linear_qkv"], shapes["linear_proj"]]


@pytest.mark.slow
def test_lora_moe_ep2_equals_transformers(tp1_env, tmp_path):
    """tests/scripts/moe_peft_parity.py under torchrun at EP=2: each rank holds only its
    experts' adapters; the trainable count is the hand count (as at EP=1); the adapter checkpoint
    saved at EP=2, exported merged, gives transformers' class the EP=2 logits; read back at
    TP=2 + SP x EP=2 it gives them too. (LoRA training through the CLI at EP=2 equals EP=1:
    test_moe_train.test_lora_ep2_equals_ep1, in that module's launches.)"""
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.checkpoint.hf.verify import hf_logits
    from megatron_mft.peft import lora_params

    families = ("qwen2_moe",)  # as tests/scripts/moe_peft_parity.py
    for name in families:
        make_moe_model(name, tmp_path / name, seed=3)
    cmd = torchrun(2) + [str(ROOT / "tests" / "scripts" / "moe_peft_parity.py"), str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env(threads=1), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    toks = tokens()
    assert sorted(result) == list(families)
    for name in families:
        r = result[name]
        arch = model_config_from_hf(read_hf_config(tmp_path / name)).arch()
        all_targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
        assert r["trainable"] == lora_params(arch, 4, all_targets), (name, r)
        assert r["local_expert_adapters"] == r["expected_local"], (name, r)
        assert r["trainable_tp2"] == r["trainable"] and r["tp2_vs_ep2"] <= TOL, (name, r)  # TP=2+SP x EP=2
        export_to_hf(tmp_path / f"{name}_run", tmp_path / f"{name}_merged", merge_lora=True, log=lambda s: None)
        ep2 = torch.load(tmp_path / f"{name}_logits.pt")
        assert (hf_logits(tmp_path / name, toks) - ep2).abs().max() > 0.05, name  # adapters matter
        assert (hf_logits(tmp_path / f"{name}_merged", toks) - ep2).abs().max() <= TOL, name


def test_moe_memory_estimate_by_hand():
    """Mixtral-8x7B QLoRA r=32, s=4096: every expert's weights in NF4 (/ ep per GPU), the router,
    norms and embeddings in bf16; one adapter pair per expert (/ ep); Adam state of expert
    adapters over the expert-DP ranks; each extra routed expert per token adds one expert's
    activations."""
    import dataclasses as dc

    from megatron_mft.config import PRESETS
    from megatron_mft.peft.memory import NF4_BYTES_PER_PARAM, estimate_memory

    arch = PRESETS["mixtral-8x7b"]
    h, f, kv, V, L, E, r, T = 4096, 14336, 1024, 32000, 32, 8, 32, 4096
    attn = h * (h + 2 * kv) + h * h
    attn_adapters = r * (h + h + 2 * kv) + r * (h + h)
    expert_adapters = r * (h + 2 * f) + r * (f + h)
    for ep, dp in ((1, 1), (4, 4)):
        est = estimate_memory(arch, method="qlora", rank=r, seq_length=T, ep=ep, dp=dp)
        base = L * ((attn + E * 3 * h * f / ep) * NF4_BYTES_PER_PARAM + (E * h + 2 * h) * 2) + (2 * V * h + h) * 2
        assert est.base_weights == pytest.approx(base, rel=1e-12), ep
        local = L * (attn_adapters + E / ep * expert_adapters)
        assert est.adapters == pytest.approx(2 * local) and est.grads == pytest.approx(4 * local)
        assert est.optimizer == pytest.approx(12 * L * (attn_adapters / dp + E / ep * expert_adapters / (dp // ep)))
        assert est.trainable_params == L * (attn_adapters + E * expert_adapters)
    assert estimate_memory(arch, method="qlora", rank=r, ep=1).total > 30e9 > estimate_memory(
        arch, method="qlora", rank=r, ep=4, dp=4).total  # EP splits the experts
    one = estimate_memory(dc.replace(arch, moe_top_k=1), method="lora", rank=r, seq_length=T, recompute="none")
    two = estimate_memory(arch, method="lora", rank=r, seq_length=T, recompute="none")
    assert two.activations - one.activations == pytest.approx(L * T * 2 * (2 * f + h + r + f + r))
