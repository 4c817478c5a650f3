"""LoRA per model family on one process: adapters on every linear slot of each family's tiny
model (Qwen2's QKV bias, StarCoder2's biases, LayerNorm and plain GELU MLP, tied embeddings)
exported as a peft adapter load onto the family's own transformers class and give the megatron
LoRA model's logits; the merged export gives them through the plain class. Biases, norms and
embeddings stay frozen (peft's ``bias="none"``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from test_families_fixtures import FAMILIES, FAMILY_CONFIGS, TOL, VOCAB, make_family_model, tokens

#: peft target modules each family's adapters become (HF module names)
TARGETS = {
    "llama3": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "starcoder2": ["c_fc", "c_proj", "k_proj", "o_proj", "q_proj", "v_proj"],
}


@pytest.mark.parametrize("name, method", [(n, "lora") for n in FAMILIES] + [("starcoder2", "qlora")])
def test_lora_adapter_and_merged_exports_per_family(tp1_env, tmp_path, name, method):
    """QLoRA on StarCoder2: NF4 weights next to dense biases on every linear."""
    from megatron_mft.checkpoint.dist import save_checkpoint
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.checkpoint.hf.verify import hf_logits, megatron_logits
    from megatron_mft.config import ParallelConfig, PeftConfig, RunConfig
    from megatron_mft.config.base import to_dict
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan, iter_adapters

    hf = make_family_model(name, tmp_path / "hf", seed=3)
    model = dataclasses.replace(model_config_from_hf(read_hf_config(hf)), precision="fp32", hf_init=str(hf))
    peft = PeftConfig(method=method, rank=4, alpha=8.0)
    plan = PeftPlan(peft, tp1_env, seed=3)
    chunks = build_model_chunks(model, ParallelConfig(), tp1_env, layer=plan.layer_spec(model))
    load_hf_into_chunks(hf, chunks, model, ParallelConfig())
    plan.prepare(chunks)
    trainable = {n for n, p in chunks[0].named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # biases, norms, embeddings frozen
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for _, m in iter_adapters(chunks):
            m.lora_B.weight.normal_(0.0, 0.3, generator=g)
    toks = tokens()
    lora_logits = megatron_logits(chunks, toks, VOCAB)
    run = RunConfig(model=model, peft=peft, output_dir=str(tmp_path / "run"))
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, chunks, None, common={"step": 1},
                    run_info={"config": to_dict(run), "peft": method}, trainable_only=True)

    base_logits = hf_logits(hf, toks)
    assert (base_logits - lora_logits).abs().max() > 0.05  # the adapters matter
    export_to_hf(tmp_path / "run", tmp_path / "adapter", adapter_only=True, log=lambda s: None)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == TARGETS.get(name, TARGETS["llama3"]) and cfg["bias"] == "none"
    with_peft = hf_logits(hf, toks, adapter=tmp_path / "adapter")
    if method == "lora":
        assert (with_peft - lora_logits).abs().max() <= TOL, name
    else:  # trained on the NF4 base; on the full-precision base the adapter is close, not equal
        assert (with_peft - lora_logits).abs().max() < (base_logits - lora_logits).abs().max()

    export_to_hf(tmp_path / "run", tmp_path / "merged", merge_lora=True, log=lambda s: None)
    import transformers

    merged_cls = getattr(transformers, FAMILY_CONFIGS[name][1])
    assert type(merged_cls.from_pretrained(tmp_path / "merged")) is merged_cls
    assert (hf_logits(tmp_path / "merged", toks) - lora_logits).abs().max() <= TOL, name
