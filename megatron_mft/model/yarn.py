"""YaRN RoPE scaling (long-context Qwen2.5) on megatron-core's own RotaryEmbedding.

megatron-core's GPT path cannot serve YaRN as transformers computes it: its ``yarn`` position
embedding reads MLA-only config fields and drops the attention factor (mscale). The two parts of
YaRN are therefore given to megatron separately, each through a plain megatron option:

* the per-frequency blend of interpolated and extrapolated frequencies replaces the ``inv_freq``
  buffer of the model's ``RotaryEmbedding`` (formula of transformers' ``_compute_yarn_parameters``,
  beta_fast 32, beta_slow 1, truncated correction range);
* transformers multiplies cos and sin by the attention factor ``0.1 ln(factor) + 1``, i.e. both q
  and k: the attention scores grow by its square, which is ``TransformerConfig.softmax_scale`` =
  factor^2 / sqrt(head_dim).
"""

from __future__ import annotations

import math

import torch

BETA_FAST, BETA_SLOW = 32, 1


def yarn_attention_factor(factor: float) -> float:
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_inv_freq(head_dim: int, base: float, factor: float, original_max_positions: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], float32, on ``device`` (explicitly: the conversion
    builds its model template under a ``meta`` default device, where megatron still keeps the
    frequencies on the host)."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(BETA_FAST)), 0)
    high = min(math.ceil(correction_dim(BETA_SLOW)), head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, head_dim, 2, device=device).to(dtype=torch.float) / head_dim)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
