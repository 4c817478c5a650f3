"""RMSNorm and LayerNorm in plain PyTorch that work with sequence parallelism.

megatron-core's local ``WrappedTorchNorm`` refuses sequence parallelism; the only thing SP
needs from a norm is that its weight is marked ``sequence_parallel`` so ``finalize_model_grads``
all-reduces its gradient over the tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def _norm_param(config: TransformerConfig, hidden_size: int, value: float) -> torch.nn.Parameter:
    """A norm weight or bias on the device megatron puts every other weight on: nothing moves
    modules afterwards (megatron's DDP moves only trainable parameters, and only with the
    distributed optimizer); marked for SP's gradient all-reduce."""
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
    p = torch.nn.Parameter(torch.full((hidden_size,), value, dtype=config.params_dtype, device=device))
    setattr(p, "sequence_parallel", config.sequence_parallel)
    return p


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = _norm_param(config, hidden_size, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(torch.nn.Module):
    """LayerNorm with weight and bias (StarCoder2), both marked for sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = _norm_param(config, hidden_size, 1.0)
        self.bias = _norm_param(config, hidden_size, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


#: TransformerConfig.normalization -> our norm module (local spec)
NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}
