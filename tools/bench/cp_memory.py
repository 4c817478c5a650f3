#!/usr/bin/env python
"""Activation memory per rank of one attention block at CP=1 vs CP=2, on CPU/gloo.

Activation memory = bytes of the tensors autograd saves for backward (counted with
``torch.autograd.graph.saved_tensors_hooks``, each storage once), for one layer's work on one
packed sequence: QKV projection of the rank's tokens, the core attention (at CP=2 the
all-gather-KV attention, which keeps the whole sequence's K/V) and the output projection.
A count, not a timing: it does not depend on machine load.

    python tools/bench/cp_memory.py [--seq 4096] [--hidden 1024] [--heads 16] [--groups 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _attention(cp: int, a):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mft.model.attention import PackedCoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=a.hidden, num_attention_heads=a.heads,
                            num_query_groups=a.groups, kv_channels=a.hidden // a.heads, attention_dropout=0.0,
                            context_parallel_size=cp)
    return PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", use_flash=False,
                               pg_collection=SimpleNamespace(cp=torch.distributed.group.WORLD))


def measure(cp: int, a) -> int:
    """Bytes saved for backward on this rank."""
    from megatron_mft.model import build_packed_seq_params

    d = a.hidden // a.heads
    t = a.seq // cp
    torch.manual_seed(0)
    qkv = torch.nn.Linear(a.hidden, (a.heads + 2 * a.groups) * d, bias=False)
    proj = torch.nn.Linear(a.hidden, a.hidden, bias=False)
    attn = _attention(cp, a)
    x = torch.randn(t, a.hidden, requires_grad=True)
    cu = torch.tensor([0, a.seq], dtype=torch.int32)
    seen: dict = {}

    def pack(tensor):
        s = tensor.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
        q, k, v = qkv(x).split([a.heads * d, a.groups * d, a.groups * d], dim=-1)
        q, k, v = q.view(t, a.heads, d), k.view(t, a.groups, d), v.view(t, a.groups, d)
        out = proj(attn(q, k, v, None, packed_seq_params=build_packed_seq_params(cu, a.seq, "cpu")))
    out.sum().backward()
    return sum(seen.values())


def _worker(rank, world, port, a, result):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        result[rank] = measure(world, a)
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_mft.compat import setup_runtime

    setup_runtime()
    figures = {}
    for cp in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = mp.Manager().dict()
        mp.spawn(_worker, args=(cp, port, a, result), nprocs=cp, join=True)
        figures[f"cp{cp}_max_rank_bytes"] = max(result.values())
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
                      "seq": a.seq, "hidden": a.hidden, "heads": a.heads, "groups": a.groups, **figures,
                      "ratio_cp2_over_cp1": figures["cp2_max_rank_bytes"] / figures["cp1_max_rank_bytes"]},
                     indent=1))


if __name__ == "__main__":
    main()
