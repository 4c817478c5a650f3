"""Helpers for the Hugging Face conversion tests (imported by tests/test_hf_*.py and
tests/test_convert_*.py; no tests here): tiny random transformers Llama models on disk, their
state dicts, and the conversion CLI in a subprocess. The one-process megatron environment is
conftest's ``tp1_env``."""

from __future__ import annotations

import json
import os
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


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m megatron_mft.convert ARGS`` in a fresh process (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "megatron_mft.convert", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
