"""RMSNorm in plain PyTorch that works with sequence parallelism.

megatron-core's local ``WrappedTorchNorm`` refuses sequence parallelism; the only thing SP
needs from a norm is that its weight is marked ``sequence_parallel`` so ``finalize_model_grads``
all-reduces its gradient over the tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
