"""Logit parity between a megatron model (any TP/PP) and the Hugging Face model it claims to be.

The process setup (one process, torchrun, or self-spawned ranks) lives in
:mod:`megatron_mft.convert`; these functions expect torch.distributed and megatron's parallel
state to be initialised.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from megatron_mft.checkpoint.hf.hfconfig import check_model_config, model_config_from_hf, read_hf_config
from megatron_mft.config import ModelConfig, ParallelConfig


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def build_megatron(hf_dir: str | Path, ckpt: Optional[str | Path], parallel: ParallelConfig, env,
                   precision: str = "fp32") -> tuple[list, ModelConfig]:
    """This rank's chunks with weights from ``ckpt`` (a conversion output or a training
    checkpoint, LoRA runs included: base + adapters) or, without ``ckpt``, from ``hf_dir`` through
    ``load_hf_into_chunks`` (the ``model.hf_init`` path)."""
    from megatron_mft.checkpoint.dist import load_checkpoint, load_model_weights
    from megatron_mft.checkpoint.hf.load import load_hf_into_chunks
    from megatron_mft.model import build_model_chunks

    if ckpt is None:
        model_cfg = model_config_from_hf(read_hf_config(hf_dir), source=str(hf_dir))
        model_cfg = dataclasses.replace(model_cfg, precision=precision)
        chunks = build_model_chunks(model_cfg, parallel, env)
        load_hf_into_chunks(hf_dir, chunks, model_cfg, parallel)
        return chunks, model_cfg

    from megatron_mft.checkpoint.hf.mcore_to_hf import describe_checkpoint

    info = describe_checkpoint(ckpt)
    model_cfg = dataclasses.replace(info.model_cfg, precision=precision, hf_init=None)
    check_model_config(model_cfg, read_hf_config(hf_dir), str(hf_dir))
    if not info.adapters:
        chunks = build_model_chunks(model_cfg, parallel, env)
        load_model_weights(info.path, chunks)
        return chunks, model_cfg
    from megatron_mft.peft import PeftPlan

    plan = PeftPlan(info.peft_cfg, env)
    chunks = build_model_chunks(model_cfg, parallel, env, layer=plan.layer_spec(model_cfg))
    kind, base = info.base  # as the recipe loads the base of a PEFT run
    if kind == "hf":
        load_hf_into_chunks(base, chunks, model_cfg, parallel)
    else:
        load_model_weights(base, chunks)
    plan.prepare(chunks, init_adapters=False)
    load_checkpoint(info.path, chunks, trainable_only=True)
    return chunks, model_cfg


@torch.no_grad()
def megatron_logits(chunks: list, tokens: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, vocab_size] on the last pipeline stage (gathered over TP);
    None on the other stages. Stages hand activations on with plain send/recv."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if len(chunks) != 1:
        raise ValueError("verify runs without virtual pipeline stages (one chunk per rank)")
    (model,) = chunks
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    b, s = tokens.shape
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    cfg = model.config
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, cfg.hidden_size, dtype=cfg.params_dtype, device=device)
        torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(input_ids=tokens, position_ids=pos, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    logits = gather_from_tensor_model_parallel_region(out)
    return logits[..., :vocab_size].float().cpu()


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor, adapter: Optional[str | Path] = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of the transformers model in ``hf_dir`` (on the CPU), with a peft adapter applied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model(input_ids=tokens).logits.float()
