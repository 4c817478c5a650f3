"""Core attention that honours packed sequences on every backend without TE.

megatron-core's local ``DotProductAttention`` rejects ``PackedSeqParams`` and materialises
[b*h, s, s] scores with K/V copied per head. ``PackedCoreAttention`` takes the same arguments and:

* ``qkv_format="thd"`` (packed): flash-attn's varlen kernel when installed (CUDA), else torch SDPA
  over blocks of whole segments with a block-diagonal causal mask, so packed samples never
  attend to each other;
* ``sbhd`` (one sample per row, dynamic padding): causal SDPA (flash kernel on GPU).

GQA is native in both kernels (no K/V copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:  # optional kernel, probed here and in megatron_mft.compat.probe
    from flash_attn import flash_attn_varlen_func  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


@dataclass
class MFTPackedSeqParams(PackedSeqParams):
    """PackedSeqParams plus a host-side plan: token ranges [start, end) of blocks of whole
    segments, computed once per micro batch (no device sync inside the layers)."""

    blocks: list = field(default_factory=list)
    host_cu_seqlens: list = field(default_factory=list)
    #: block-diagonal masks per block, built by the first layer and reused by the others
    masks: dict = field(default_factory=dict)


def plan_blocks(cu_seqlens: list[int], target: int) -> list[tuple[int, int, bool]]:
    """Group consecutive segments into blocks of about ``target`` tokens.

    Returns (start, end, single_segment) per block. A segment longer than ``target`` gets a
    block of its own.
    """
    blocks, start, prev = [], cu_seqlens[0], cu_seqlens[0]
    nseg = 0
    for end in cu_seqlens[1:]:
        if end - start > target and nseg > 0:
            blocks.append((start, prev, nseg == 1))
            start, nseg = prev, 0
        prev, nseg = end, nseg + 1
    if nseg:
        blocks.append((start, prev, nseg == 1))
    return blocks


def build_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, device, block_target: int = 4096):
    cu_list = cu_seqlens.tolist()
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return MFTPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
        blocks=plan_blocks(cu_list, max(block_target, max_seqlen)),
        host_cu_seqlens=cu_list,
    )


def _block_causal_mask(cu: list[int], start: int, end: int, device) -> torch.Tensor:
    """Boolean [L, L] mask, True where attention is allowed (same segment and causal)."""
    lengths = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:]) if a >= start and b <= end], device=device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    idx = torch.arange(end - start, device=device)
    return (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])


class PackedCoreAttention(MegatronModule):
    """Drop-in for megatron's core_attention slot (same constructor and forward arguments)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        use_flash: bool = True,
    ):
        super().__init__(config=config)
        assert config.context_parallel_size == 1, "context parallelism needs Transformer Engine"
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale
        self.use_flash = use_flash and flash_attn_varlen_func is not None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        assert attention_bias is None, "attention bias is not supported"
        p = self.dropout if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._thd(query, key, value, packed_seq_params, p)
        # sbhd: [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale,
                                             enable_gqa=self.groups != self.heads)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    def _thd(self, q, k, v, params: PackedSeqParams, p: float) -> torch.Tensor:
        # q: [t, heads, d]; k, v: [t, groups, d]
        t = q.shape[0]
        if self.use_flash and q.is_cuda:
            out = flash_attn_varlen_func(q, k, v, params.cu_seqlens_q, params.cu_seqlens_kv,
                                         params.max_seqlen_q, params.max_seqlen_kv, dropout_p=p,
                                         softmax_scale=self.scale, causal=True)
            return out.reshape(t, self.heads * self.head_dim)
        if not isinstance(params, MFTPackedSeqParams):
            params = build_packed_seq_params(params.cu_seqlens_q, params.max_seqlen_q or 0, q.device)
        outs = []
        for start, end, single in params.blocks:
            qb, kb, vb = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            mask = None
            if not single:
                mask = params.masks.get(start)
                if mask is None:
                    mask = params.masks[start] = _block_causal_mask(params.host_cu_seqlens, start, end, q.device)
            gqa = self.groups != self.heads
            if gqa and mask is not None and qb.is_cuda:
                # CUDA's memory-efficient kernel takes a mask but not enable_gqa (that combination
                # falls back to the O(s^2)-memory math kernel): expand K/V to all heads instead.
                rep = self.heads // self.groups
                kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
                gqa = False
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=p, is_causal=single,
                                                scale=self.scale, enable_gqa=gqa)
            outs.append(ob.squeeze(0).transpose(0, 1))
        out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        return out.reshape(t, self.heads * self.head_dim)
