"""Helpers for the Hugging Face conversion tests (imported by tests/test_hf_*.py and
tests/test_convert_*.py; no tests here): tiny random transformers Llama models on disk and a
one-process megatron environment."""

from __future__ import annotations

import json
import os
from train_helpers import free_port
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: CodeLlama's features at toy size: grouped-query attention (4 heads, 2 KV heads), rope_theta 1e6,
#: an odd-sized vocabulary (32016 scaled down to 250).
TINY = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=128, rms_norm_eps=1e-5,
            tie_word_embeddings=False)




def make_hf_model(out: Path, seed: int = 0, max_shard_size: str = "40KB", **overrides) -> Path:
    """A random LlamaForCausalLM (fp32) saved with ``save_pretrained`` in many shards, plus a
    tokenizer_config.json to show tokenizer files travel. Weights are scaled so logits are O(1-10)
    (a parity check on near-zero logits would prove little)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, "test_marker": seed}))
    return out


def hf_state(folder: Path) -> dict:
    """Every tensor of an HF folder's safetensors files."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def init_single_process(seed: int = 0):
    """torch.distributed world of 1 (created if absent) + megatron parallel state TP=1/PP=1.
    Returns (env, created) where ``created`` says whether the caller should destroy the group."""
    import torch.distributed as dist

    from megatron_mft.compat import setup_runtime
    from megatron_mft.config import ParallelConfig
    from megatron_mft.training.parallel import init_parallel

    env = setup_runtime()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_parallel(ParallelConfig(), env, seed)
    return env, created


def finish_single_process(created: bool) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m megatron_mft.convert ARGS`` in a fresh process (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "megatron_mft.convert", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
