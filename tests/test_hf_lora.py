"""LoRA / QLoRA export on one process: an adapter-only training checkpoint (saved the way the
recipe saves it, run.json naming its base) exported as a peft adapter gives the megatron LoRA
model's logits through ``peft.PeftModel``; exported merged, through plain transformers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from test_hf_fixtures import TINY, make_hf_model

V = TINY["vocab_size"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "tiny", seed=1)


def _tokens():
    from megatron_mft.checkpoint.hf.verify import random_tokens

    return random_tokens(V, 2, 20, seed=5)


def _train_like_run(tp1_env, tiny_hf: Path, out: Path, method: str, base: str) -> tuple[Path, torch.Tensor]:
    """A LoRA model as the recipe builds it (base from hf_init or init_checkpoint, prepare), with
    non-trivial adapters, saved adapter-only with its run.json; returns (step dir, its logits)."""
    from megatron_mft.checkpoint.dist import load_model_weights, save_checkpoint
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.checkpoint.hf.verify import megatron_logits
    from megatron_mft.config import ParallelConfig, PeftConfig, RunConfig, TrainConfig
    from megatron_mft.config.base import to_dict
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan, iter_adapters

    model = dataclasses.replace(model_config_from_hf(read_hf_config(tiny_hf)), precision="fp32")
    train = TrainConfig()
    if base == "hf":
        model = dataclasses.replace(model, hf_init=str(tiny_hf))
    else:
        ckpt = out / "base_ckpt"
        convert_hf_to_mcore(tiny_hf, ckpt, log=lambda s: None)
        train = TrainConfig(init_checkpoint=str(ckpt))
    peft = PeftConfig(method=method, rank=4, alpha=8.0, rslora=method == "qlora")
    plan = PeftPlan(peft, tp1_env, seed=3)
    chunks = build_model_chunks(model, ParallelConfig(), tp1_env, layer=plan.layer_spec(model))
    if base == "hf":
        load_hf_into_chunks(tiny_hf, chunks, model, ParallelConfig())
    else:
        load_model_weights(train.init_checkpoint, chunks)
    plan.prepare(chunks)
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for _, m in iter_adapters(chunks):
            m.lora_B.weight.normal_(0.0, 0.3, generator=g)
    run = RunConfig(model=model, peft=peft, train=train, output_dir=str(out))
    save_checkpoint(out / "checkpoints", 7, chunks, None, common={"step": 7},
                    run_info={"config": to_dict(run), "peft": method}, trainable_only=True)
    return out, megatron_logits(chunks, _tokens(), V)


@pytest.mark.parametrize("method, base", [("lora", "mcore"), ("qlora", "hf")])
def test_adapter_and_merged_exports_reproduce_the_lora_model(tp1_env, tiny_hf, tmp_path, method, base):
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.checkpoint.hf.verify import build_megatron, hf_logits, megatron_logits
    from megatron_mft.config import ParallelConfig

    run_dir, lora_logits = _train_like_run(tp1_env, tiny_hf, tmp_path / "run", method, base)
    tokens = _tokens()
    base_logits = hf_logits(tiny_hf, tokens)
    assert (base_logits - lora_logits).abs().max() > 0.05  # the adapters matter

    merged = tmp_path / "merged"
    export_to_hf(run_dir, merged, merge_lora=True, log=lambda s: None)  # output_dir -> checkpoints/latest
    assert (hf_logits(merged, tokens) - lora_logits).abs().max() <= 1e-4

    adapter = tmp_path / "adapter"
    export_to_hf(run_dir, adapter, adapter_only=True, log=lambda s: None)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with_peft = hf_logits(tiny_hf, tokens, adapter=adapter)
    if method == "lora":
        assert (with_peft - lora_logits).abs().max() <= 1e-4
    else:  # QLoRA trained on an NF4 base; the adapter applied to the full-precision base is close
        assert (with_peft - lora_logits).abs().max() < (base_logits - lora_logits).abs().max()

    # verify's adapter-run path rebuilds the same model (base + adapters) from the checkpoint
    chunks, _ = build_megatron(merged, run_dir, ParallelConfig(), tp1_env)
    assert (megatron_logits(chunks, tokens, V) - lora_logits).abs().max() <= 1e-5


def test_adapter_checkpoint_needs_an_export_mode(tp1_env, tiny_hf, tmp_path):
    """An adapter-only checkpoint asks for --merge-lora or --adapter-only; the adapter export
    works without the base, the merge names the missing base."""
    import shutil

    from megatron_mft.checkpoint.hf import ConversionError
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf

    base = tmp_path / "base"
    shutil.copytree(tiny_hf, base)
    run_dir, _ = _train_like_run(tp1_env, base, tmp_path / "run", "lora", "hf")
    with pytest.raises(ConversionError, match="holds LoRA adapters only"):
        export_to_hf(run_dir, tmp_path / "x", log=lambda s: None)
    with pytest.raises(ConversionError, match="exclude each other"):
        export_to_hf(run_dir, tmp_path / "x", merge_lora=True, adapter_only=True, log=lambda s: None)
    shutil.rmtree(base)
    export_to_hf(run_dir, tmp_path / "adapter", adapter_only=True, log=lambda s: None)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ConversionError, match=f"{base} is not a Hugging Face model folder"):
        export_to_hf(run_dir, tmp_path / "merged", merge_lora=True, log=lambda s: None)
