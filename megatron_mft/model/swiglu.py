"""SwiGLU without megatron's ``jit_fuser``: megatron-core's fused bias+SwiGLU slot filled with
torch code on machines without CUDA.

megatron's unfused path (``bias_activation_fusion=False``) computes ``silu(x1) * (x2 + 0.0)``
on the two strided halves of fc1's output: the ``+ glu_linear_offset`` is one more pass and one
more saved tensor, and autograd's chunk backward concatenates the two half gradients in another.
Its fused path (``bias_swiglu_impl``) is ``torch.compile``d, which on a CPU means a C++ compile
per process (tens of seconds). :class:`SwiGLU` does the same arithmetic as the unfused path in
the same order (``silu``, ``*``; backward ``g * x2`` into ``silu_backward``, ``g * silu(x1)``)
and writes both half gradients straight into one output: bit-identical, 1.2-1.6x faster on CPU
(docs/performance.md). Installed only without CUDA and for dense models; GPUs keep megatron's
fused kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class SwiGLU(torch.autograd.Function):
    """silu(y1) * y2 over the two halves of the last dimension of y."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = torch.chunk(y, 2, -1)
        act = F.silu(y1)
        ctx.save_for_backward(y, act)
        return act * y2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        y, act = ctx.saved_tensors
        y1, y2 = torch.chunk(y, 2, -1)
        out = torch.empty_like(y)
        half = y1.shape[-1]
        torch.ops.aten.silu_backward.grad_input(grad * y2, y1, grad_input=out[..., :half])
        torch.mul(grad, act, out=out[..., half:])
        return out


def bias_swiglu(y: torch.Tensor, bias: Optional[torch.Tensor], fp8_input_store: bool = False,
                cpu_offload_input: bool = False) -> torch.Tensor:
    """Signature of megatron's ``bias_swiglu_impl`` (no fp8 input store, no offloading on CPU)."""
    if fp8_input_store or cpu_offload_input:
        raise ValueError("SwiGLU on CPU: fp8 input store and activation offloading need CUDA")
    return SwiGLU.apply(y if bias is None else y + bias)


def install_torch_swiglu() -> bool:
    """Point megatron's dense MLP at :func:`bias_swiglu` (called by the model builder without
    CUDA); True: ``bias_activation_fusion`` may be set for a dense SwiGLU model. Not for MoE:
    megatron's experts take the ``torch.compile``d weighted variant."""
    from megatron.core.transformer import mlp

    mlp.bias_swiglu_impl = bias_swiglu
    return True
