"""megatron's linear autograd Functions with their forward GEMM as ``F.linear`` on the CPU.

megatron-core computes every parallel linear's forward as ``torch.matmul(input, weight.t())``
on the [s, b, h] input. On the CPU ``F.linear`` on the same operands gives the same bits
(``tests/test_engine_fast_paths.py``) in less time: 3% over the tiny preset's linears in turn
(median of 20 pairs, ``tools/bench/engine_parts.py``), 12-14% when one shape repeats (MKL takes
another path for the folded 3-D product). The subclasses below keep megatron's backward
(weight-gradient accumulation into ``main_grad``, the dgrad all-reduce) and replace only the
forward product; sequence parallelism keeps megatron's forward (its all-gather buffer).
Installed by the model builder only without CUDA: GPUs keep megatron's code as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import layers


class _TrainableLinear(layers.LinearWithGradAccumulationAndAsyncCommunication):
    _megatron_forward = layers.LinearWithGradAccumulationAndAsyncCommunication.forward

    @staticmethod
    @layers.custom_fwd
    def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                grad_output_buffer, wgrad_deferral_limit, tp_group):
        if sequence_parallel:
            return _TrainableLinear._megatron_forward(ctx, input, weight, bias, gradient_accumulation_fusion,
                                                      allreduce_dgrad, sequence_parallel, grad_output_buffer,
                                                      wgrad_deferral_limit, tp_group)
        # what megatron's forward records for its backward, then the product
        ctx.save_for_backward(input, weight)
        ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
        ctx.use_bias = bias is not None
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.wgrad_deferral_limit = wgrad_deferral_limit
        ctx.grad_output_buffer = grad_output_buffer
        ctx.tp_group = tp_group
        output = F.linear(input, weight)
        return output if bias is None else output + bias  # megatron adds the bias after the GEMM


class _FrozenLinear(layers.LinearWithFrozenWeight):
    @staticmethod
    @layers.custom_fwd
    def forward(ctx, input, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(weight)
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.tp_group = tp_group
        output = F.linear(input, weight)
        return output if bias is None else output + bias


def install_torch_linear() -> None:
    """Point megatron's linear entry points at the subclasses (once per process; CPU only)."""
    layers.LinearWithGradAccumulationAndAsyncCommunication = _TrainableLinear
    layers.LinearWithFrozenWeight = _FrozenLinear

