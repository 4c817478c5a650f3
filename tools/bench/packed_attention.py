"""Packed (THD) causal attention without TE: the ways to keep documents apart, timed forward and
backward (process CPU time) on the same q/k/v, alternating, with the largest difference from the masked reference.

    python tools/bench/packed_attention.py [--threads 1] [--reps 7]

* ``masked``: one SDPA call over the whole micro batch with a materialised block-diagonal causal
  [t, t] mask (what the engine did before; on CUDA a mask also rules out the flash kernel);
* ``engine``: ``PackedCoreAttention`` as built now (one causal SDPA call per run of equal-length
  consecutive documents, zero-copy views);
* ``padded``: documents gathered into length buckets (powers of two), padded, one batched causal
  call per bucket, scattered back;
* ``nested``: SDPA over a jagged nested tensor of the documents (tried once; the error is printed);
* ``flex``: torch FlexAttention with a document block mask (``torch.compile``d); on CPU in this
  torch only the forward exists, so it is timed forward-only and its backward is reported as
  unsupported (the error text is printed).

Shapes follow the tiny preset (4 heads, 2 KV groups, head dim 32) unless given.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F


from megatron_mft.config import tool_config  # noqa: E402
from megatron_mft.config.base import int_range  # noqa: E402
from megatron_mft.errors import command  # noqa: E402


def layouts(seed: int = 0) -> dict[str, list[int]]:
    rnd = random.Random(seed)

    def pack(seq, rows, lo, hi):
        out = []
        for _ in range(rows):
            left = seq
            while left > 0:
                n = min(left, rnd.randint(lo, hi))
                out.append(n)
                left -= n
        return out

    return {"2 x 512, 1 doc/row": [512, 512], "2 x 512, packed (40-200)": pack(512, 2, 40, 200),
            "2 x 2048, 1 doc/row": [2048, 2048], "2 x 2048, packed (50-400)": pack(2048, 2, 50, 400)}


def masked(q, k, v, lengths):
    t = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = torch.arange(t)
    mask = (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1).reshape(t, -1)


def make_engine(heads, groups, dim):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mft.model.attention import PackedCoreAttention, build_packed_seq_params

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads, num_query_groups=groups,
                            kv_channels=dim, attention_dropout=0.0)
    attn = PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", use_flash=False)

    def engine(q, k, v, lengths):
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        return attn(q, k, v, None, packed_seq_params=build_packed_seq_params(cu, max(lengths), q.device))

    return engine


def padded(q, k, v, lengths):
    t, buckets = q.shape[0], {}
    start = 0
    for n in lengths:
        size = 1 << (n - 1).bit_length()
        buckets.setdefault(size, []).append((start, n))
        start += n
    pad = lambda x: torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # noqa: E731
    qp, kp, vp = pad(q), pad(k), pad(v)
    outs, idxs = [], []
    for size, docs in buckets.items():
        st = torch.tensor([a for a, _ in docs])
        ln = torch.tensor([n for _, n in docs])
        ar = torch.arange(size)[None]
        gidx = torch.where(ar < ln[:, None], st[:, None] + ar, t)
        qb, kb, vb = (x[gidx.reshape(-1)].reshape(len(docs), size, *x.shape[1:]).transpose(1, 2) for x in (qp, kp, vp))
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True).transpose(1, 2)
        valid = ar < ln[:, None]
        outs.append(o[valid])
        idxs.append(gidx[valid])
    out = torch.empty_like(q).index_copy(0, torch.cat(idxs), torch.cat(outs))
    return out.reshape(t, -1)


def make_flex():
    """(block-mask builder, attention) for torch FlexAttention, the kernel compiled once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def block_mask(lengths):
        t = sum(lengths)
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return create_block_mask(lambda b, h, qi, ki: (seg[qi] == seg[ki]) & (qi >= ki), None, None, t, t, device="cpu")

    def attend(q, k, v, bm):
        t = q.shape[0]
        qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        return compiled(qb, kb, vb, block_mask=bm, enable_gqa=True).squeeze(0).transpose(0, 1).reshape(t, -1)

    return block_mask, attend


def timed(fn, q, k, v, lengths, backward: bool) -> tuple[float, float]:
    leaves = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    t0 = time.process_time()  # CPU time: the steadier clock on a shared machine
    out = fn(*leaves, lengths)
    t1 = time.process_time()
    if backward:
        out.square().sum().backward()
    return t1 - t0, time.process_time() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int_range(1), default=1)
    ap.add_argument("--reps", type=int_range(1), default=7)
    ap.add_argument("--heads", type=int_range(1), default=4)
    ap.add_argument("--groups", type=int_range(1), default=2)
    ap.add_argument("--dim", type=int_range(1), default=32)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its first compile takes ~30 s)")
    args = ap.parse_args()
    # an attention layer training could build (heads by KV groups; no RoPE here, so any head size): else torch's
    # error mid-run
    tool_config("packed_attention.py", {"model.num_attention_heads": args.heads, "model.num_query_groups": args.groups,
                                        "model.kv_channels": args.dim, "model.hidden_size": args.heads * args.dim},
                {"model.num_attention_heads": "--heads", "model.num_query_groups": "--groups",
                 "model.kv_channels": "--dim"}, rope=False)
    torch.set_num_threads(args.threads)
    from megatron_mft.compat import setup_runtime

    setup_runtime()
    print(f"machine: {platform.node()} | {os.cpu_count()} CPUs | load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"| torch {torch.__version__} | {args.threads} thread(s) | heads {args.heads}, KV groups {args.groups}, dim {args.dim}")
    try:  # nested/jagged tensors: does causal SDPA take ragged documents on this machine?
        docs = torch.nested.nested_tensor([torch.randn(n, args.heads, args.dim) for n in (100, 262)],
                                          layout=torch.jagged, requires_grad=True).transpose(1, 2)
        F.scaled_dot_product_attention(docs, docs, docs, is_causal=True).values().sum().backward()
        print("nested: causal SDPA over jagged documents ran (forward and backward)")
    except Exception as e:  # noqa: BLE001 - the message is the finding
        print(f"nested: {type(e).__name__}: {str(e).splitlines()[0]} (torch: nested query/key are not supported "
              f"with is_causal=True)")
    methods = {"masked": masked, "engine": make_engine(args.heads, args.groups, args.dim), "padded": padded}
    flex = None if args.no_flex else make_flex()
    g = torch.Generator().manual_seed(0)
    for name, lengths in layouts().items():
        t = sum(lengths)
        q, k, v = (torch.randn(t, h, args.dim, generator=g) for h in (args.heads, args.groups, args.groups))
        ref = masked(q, k, v, lengths)
        times = {m: [] for m in methods}
        for fn in methods.values():  # warm-up
            timed(fn, q, k, v, lengths, True)
        for rep in range(args.reps):
            order = list(methods.items())
            order = order[rep % len(order):] + order[:rep % len(order)]
            for m, fn in order:
                times[m].append(timed(fn, q, k, v, lengths, True))
        print(f"\n{name}: {len(lengths)} documents, {t} tokens")
        for m, fn in methods.items():
            err = (fn(q, k, v, lengths) - ref).abs().max().item()
            fwd = statistics.median(x[0] for x in times[m]) * 1e3
            bwd = statistics.median(x[1] for x in times[m]) * 1e3
            print(f"  {m:7s} forward {fwd:8.2f} ms  backward {bwd:8.2f} ms  max |diff| vs masked {err:.1e}")
        if flex is not None:
            block_mask, attend = flex
            t0 = time.perf_counter()
            bm = block_mask(lengths)
            t_mask = time.perf_counter() - t0
            out = attend(q, k, v, bm)
            first = time.perf_counter() - t0
            fwd = statistics.median(timed(lambda a, b, c, _: attend(a, b, c, bm), q, k, v, lengths, False)[0]
                                    for _ in range(args.reps)) * 1e3
            try:
                timed(lambda a, b, c, _: attend(a, b, c, bm), q, k, v, lengths, True)
                note = "backward ran"
            except Exception as e:  # noqa: BLE001 - the message is the finding
                note = f"backward: {type(e).__name__}: {str(e).splitlines()[0]}"
            print(f"  flex    forward {fwd:8.2f} ms  (block mask {t_mask * 1e3:.0f} ms; first call incl. compile "
                  f"{first:.1f} s)  max |diff| {(out - ref).abs().max().item():.1e}; {note}")


if __name__ == "__main__":
    sys.exit(command(lambda argv: main() or 0)())
