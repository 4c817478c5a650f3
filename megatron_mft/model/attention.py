"""Core attention that honours packed sequences on every backend without TE, with no
materialised document mask.

megatron-core's local ``DotProductAttention`` rejects ``PackedSeqParams`` and materialises
[b*h, s, s] scores with K/V copied per head. ``PackedCoreAttention`` takes the same arguments and:

* ``qkv_format="thd"`` (packed): flash-attn's varlen kernel when installed (CUDA), else one
  causal torch SDPA call per run of consecutive equal-length segments (a zero-copy
  ``[count, heads, length, d]`` view: one document per row is one batched call), so packed
  samples never attend to each other and no [t, t] block-diagonal mask exists;
* ``sbhd`` (one sample per row, dynamic padding): causal SDPA (flash kernel on GPU).

Sliding-window attention (``TransformerConfig.window_size`` = (left, right), megatron's and
flash-attn's convention: query i sees keys j with i - left <= j <= i + right, -1 = unbounded;
``window_attn_skip_freq`` picks the layers) applies within each sample. A sample no longer than
``left + 1`` is plain causal; a longer one gets a [length, length] band mask, built once per
length per micro batch and shared by the layers (flash-attn takes the window natively).

GQA is native in the kernels (no K/V copies), except masked calls on CUDA (see ``_sdpa``).
Why per-segment calls and not FlexAttention or a mask: docs/performance.md, "Packed attention".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

try:  # optional kernel, probed here and in megatron_mft.compat.probe
    from flash_attn import flash_attn_varlen_func  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


@dataclass
class MFTPackedSeqParams(PackedSeqParams):
    """PackedSeqParams plus a host-side plan computed once per micro batch (no device sync
    inside the layers): runs of equal-length segments, and the window masks the layers share."""

    runs: list = field(default_factory=list)
    host_cu_seqlens: list = field(default_factory=list)
    #: (length, left) -> boolean band mask, built by the first windowed layer and reused
    masks: dict = field(default_factory=dict)


def plan_runs(cu_seqlens: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive segments of equal length: (start token, segment count, length).

    Each run is one batched SDPA call over a view of the packed tensor (no gather)."""
    runs: list[list[int]] = []
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        n = b - a
        if n == 0:
            continue
        if runs and runs[-1][2] == n and runs[-1][0] + runs[-1][1] * n == a:
            runs[-1][1] += 1
        else:
            runs.append([a, 1, n])
    return [tuple(r) for r in runs]


def build_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, device) -> MFTPackedSeqParams:
    cu_list = cu_seqlens.tolist()
    cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)  # pinned by the loader
    return MFTPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
        runs=plan_runs(cu_list),
        host_cu_seqlens=cu_list,
    )


def window_band_mask(length: int, left: int, device) -> torch.Tensor:
    """Boolean [length, length], True where attention is allowed: causal and i - j <= left."""
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= left)


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
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale
        self.use_flash = use_flash and flash_attn_varlen_func is not None
        #: left window (keys i-left..i), or None for full causal attention in this layer
        self.window_left: Optional[int] = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            left, right = config.window_size
            if right not in (0, -1):
                raise ValueError(f"model window_size={tuple(config.window_size)}: a causal decoder sees no keys to "
                                 f"the right; use (left, 0)")
            self.window_left = None if left < 0 else int(left)
        #: all-gather-KV context parallelism (megatron_mft.model.cp_attention), or None at CP=1
        self.cp = None
        self._cp_cache: dict = {}
        if config.context_parallel_size > 1:
            from megatron_mft.model.cp_attention import ContextParallelAttention

            group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
            self.cp = ContextParallelAttention(group, self.heads, self.groups, self.head_dim, self.scale,
                                               self.window_left)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        assert attention_bias is None, "attention bias is not supported"
        p = self.dropout if self.training else 0.0
        if self.cp is not None:
            return self._context_parallel(query, key, value, packed_seq_params, p)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._thd(query, key, value, packed_seq_params, p)
        # sbhd: [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v, p, {})
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    def _context_parallel(self, q, k, v, params: Optional[PackedSeqParams], p: float) -> torch.Tensor:
        if params is not None and params.qkv_format == "thd":
            if not isinstance(params, MFTPackedSeqParams):
                params = build_packed_seq_params(params.cu_seqlens_q, params.max_seqlen_q or 0, q.device)
            cu = params.host_cu_seqlens
            return self.cp.thd(q, k, v, params.runs, [b - a for a, b in zip(cu[:-1], cu[1:])], p, params.masks)
        if len(self._cp_cache) > 8:  # dynamic padding: a few widths recur; keep the cache bounded
            self._cp_cache.clear()
        return self.cp.sbhd(q, k, v, p, self._cp_cache)

    def _sdpa(self, q, k, v, p: float, masks: dict) -> torch.Tensor:
        """Causal (optionally windowed) SDPA over [n, heads|groups, length, d] views."""
        length = q.shape[2]
        gqa = self.groups != self.heads
        if self.window_left is None or length <= self.window_left + 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale,
                                                  enable_gqa=gqa)
        key_ = (length, self.window_left)
        mask = masks.get(key_)
        if mask is None:
            mask = masks[key_] = window_band_mask(length, self.window_left, q.device)
        if gqa and q.is_cuda:
            # CUDA's memory-efficient kernel takes a mask but not enable_gqa (that combination
            # falls back to the O(s^2)-memory math kernel): expand K/V to all heads instead.
            rep = self.heads // self.groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale,
                                              enable_gqa=gqa)

    def _thd(self, q, k, v, params: PackedSeqParams, p: float) -> torch.Tensor:
        # q: [t, heads, d]; k, v: [t, groups, d]
        t = q.shape[0]
        if self.use_flash and q.is_cuda:
            window = (-1, -1) if self.window_left is None else (self.window_left, 0)
            out = flash_attn_varlen_func(q, k, v, params.cu_seqlens_q, params.cu_seqlens_kv,
                                         params.max_seqlen_q, params.max_seqlen_kv, dropout_p=p,
                                         softmax_scale=self.scale, causal=True, window_size=window)
            return out.reshape(t, self.heads * self.head_dim)
        if not isinstance(params, MFTPackedSeqParams):
            params = build_packed_seq_params(params.cu_seqlens_q, params.max_seqlen_q or 0, q.device)
        outs = []
        for start, count, length in params.runs:
            end = start + count * length
            # [count*length, h, d] -> [count, h, length, d]: a view, no copy
            qb, kb, vb = (x[start:end].unflatten(0, (count, length)).transpose(1, 2) for x in (q, k, v))
            ob = self._sdpa(qb, kb, vb, p, params.masks)
            outs.append(ob.transpose(1, 2).reshape(count * length, self.heads * self.head_dim))
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
