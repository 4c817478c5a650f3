#!/usr/bin/env python
"""Activation memory per rank of one transformer layer at CP=1 vs CP=2, on CPU/gloo.

Activation memory = bytes of the tensors autograd saves for backward (counted with
``torch.autograd.graph.saved_tensors_hooks``, each storage once; parameters, which linear layers
also save, are not activations and are left out), for one layer's work on one packed sequence:
RMSNorm, QKV projection of the rank's tokens, the core attention (at CP=2 the all-gather-KV
attention, which keeps the whole sequence's K/V), the output projection, then RMSNorm and a
SwiGLU MLP. Printed for the attention block alone and for the whole layer. A count, not a
timing: it does not depend on machine load.

    python tools/bench/cp_memory.py [--seq 4096] [--hidden 1024] [--heads 16] [--groups 4] [--ffn 2816]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from megatron_mft.config import tool_config  # noqa: E402
from megatron_mft.config.base import int_range  # noqa: E402
from megatron_mft.errors import command  # noqa: E402


def _attention(cp: int, a):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mft.model.attention import PackedCoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=a.hidden, num_attention_heads=a.heads,
                            num_query_groups=a.groups, kv_channels=a.hidden // a.heads, attention_dropout=0.0,
                            context_parallel_size=cp)
    return PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", use_flash=False,
                               pg_collection=SimpleNamespace(cp=torch.distributed.group.WORLD))


def measure(cp: int, a) -> dict:
    """Bytes saved for backward on this rank: the attention block and the whole layer."""
    from megatron_mft.model import build_packed_seq_params

    d = a.hidden // a.heads
    t = a.seq // cp
    torch.manual_seed(0)
    norm1, norm2 = torch.nn.RMSNorm(a.hidden), torch.nn.RMSNorm(a.hidden)
    qkv = torch.nn.Linear(a.hidden, (a.heads + 2 * a.groups) * d, bias=False)
    proj = torch.nn.Linear(a.hidden, a.hidden, bias=False)
    fc1 = torch.nn.Linear(a.hidden, 2 * a.ffn, bias=False)
    fc2 = torch.nn.Linear(a.ffn, a.hidden, bias=False)
    params = {p.untyped_storage().data_ptr() for m in (norm1, norm2, qkv, proj, fc1, fc2) for p in m.parameters()}
    attn = _attention(cp, a)
    x = torch.randn(t, a.hidden, requires_grad=True)
    cu = torch.tensor([0, a.seq], dtype=torch.int32)
    seen: dict = {}

    def counter(phase: str):
        def pack(tensor):
            s = tensor.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = (phase, s.nbytes())
            return tensor
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_)

    with counter("attention"):
        q, k, v = qkv(norm1(x)).split([a.heads * d, a.groups * d, a.groups * d], dim=-1)
        q, k, v = q.view(t, a.heads, d), k.view(t, a.groups, d), v.view(t, a.groups, d)
        h = x + proj(attn(q, k, v, None, packed_seq_params=build_packed_seq_params(cu, a.seq, "cpu")))
    with counter("mlp"):
        gate, up = fc1(norm2(h)).chunk(2, dim=-1)
        out = h + fc2(torch.nn.functional.silu(gate) * up)
    out.sum().backward()
    return {"attention": sum(n for phase, n in seen.values() if phase == "attention"),
            "layer": sum(n for _, n in seen.values())}


def _worker(rank, world, port, a, result):
    from megatron_mft.launch.env import join_launcher_store

    join_launcher_store(rank, world, port, backend="gloo")  # the parent serves the store
    try:
        result[rank] = measure(world, a)
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int_range(1), default=4096)
    p.add_argument("--hidden", type=int_range(1), default=1024)
    p.add_argument("--heads", type=int_range(1), default=16)
    p.add_argument("--groups", type=int_range(1), default=4)
    p.add_argument("--ffn", type=int_range(1), default=2816, help="SwiGLU MLP width (Llama's 8/3 x hidden, rounded)")
    a = p.parse_args()
    # the shape of a layer training could build (heads by groups; no RoPE here, so any head size),
    # and a sequence the CP=2 run can split: else an error inside the spawned ranks
    tool_config("cp_memory.py", {"model.hidden_size": a.hidden, "model.num_attention_heads": a.heads,
                                 "model.num_query_groups": a.groups, "model.ffn_hidden_size": a.ffn},
                {"model.hidden_size": "--hidden", "model.num_attention_heads": "--heads",
                 "model.num_query_groups": "--groups", "model.ffn_hidden_size": "--ffn"}, rope=False,
                problems=[f"--seq: {a.seq} not divisible by 4 (the CP=2 run splits each sequence into 2 x CP = 4 "
                          f"chunks)"] if a.seq % 4 else [])  # training's CP rule; CP is fixed here, not an option
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_mft.compat import setup_runtime

    setup_runtime()
    figures = {}
    for cp in (1, 2):
        from megatron_mft.launch.env import launcher_store

        store = launcher_store(cp)  # served here until the ranks are done
        result = mp.Manager().dict()
        mp.spawn(_worker, args=(cp, store.port, a, result), nprocs=cp, join=True)
        for part in ("attention", "layer"):
            figures[f"{part}_cp{cp}_max_rank_bytes"] = max(r[part] for r in result.values())
    ratios = {f"{part}_ratio_cp2_over_cp1": figures[f"{part}_cp2_max_rank_bytes"] / figures[f"{part}_cp1_max_rank_bytes"]
              for part in ("attention", "layer")}
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
                      "seq": a.seq, "hidden": a.hidden, "heads": a.heads, "groups": a.groups, "ffn": a.ffn,
                      **figures, **ratios}, indent=1))


if __name__ == "__main__":
    sys.exit(command(lambda argv: main() or 0)())
