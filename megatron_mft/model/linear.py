"""megatron's parallel linears on the CPU: torch's own autograd where no communication is
involved, megatron's Functions with an ``F.linear`` forward GEMM where it is.

* No communication (one TP rank or a replicated input: no dgrad all-reduce, no sequence
  parallelism, no deferred weight gradients) and no bias gradient to form (megatron sums it
  over the flattened tokens, autograd over the broadcast dims: other bits): the call is
  ``F.linear`` (plus a frozen bias after the GEMM, as megatron adds it) under torch's C++
  autograd. The weight gradient lands in ``.grad`` and megatron's DDP hook adds it into
  ``main_grad``, where megatron's Python Function would have accumulated it inside the GEMM
  (``addmm_``). Outputs, input gradients and the first micro batch's weight gradient are the
  same bits; accumulating later micro batches into a non-zero ``main_grad`` differs in the last
  bit from about 512 tokens a micro batch on (MKL blocks the token dimension of the fused
  product differently; 1e-7 of the largest element), as any change of summation order would.
  No Python autograd node per linear and micro batch: 2.2% of a full fine-tuning step at one
  thread, 2.3% at two (medians of 60 paired steps, 95% CIs 1.2-3.2% and 1.1-4.3%; LoRA 2.9% and
  1.7%; docs/performance.md, fifth round). ``tests/test_engine_fast_paths.py`` checks all of it.
* Otherwise megatron's Functions (its backward: the dgrad all-reduce, SP's all-gather and
  reduce-scatter, the weight gradient into ``main_grad``) through subclasses whose forward product
  is ``F.linear`` instead of the 3-D ``matmul(x, w.t())``: the same bits, 3% over the tiny
  preset's linears in turn, 12-14% when one shape repeats (``tools/bench/engine_parts.py``);
  sequence parallelism keeps megatron's forward (its all-gather buffer).

Installed by the model builder only without CUDA: GPUs keep megatron's code as it is (the weight
gradient accumulated inside the GEMM, by Apex or training/optimizer.py's stand-in; communication
overlap).
"""

from __future__ import annotations

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
        return _local(input, weight, bias)


class _FrozenLinear(layers.LinearWithFrozenWeight):
    @staticmethod
    @layers.custom_fwd
    def forward(ctx, input, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(weight)
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.tp_group = tp_group
        return _local(input, weight, bias)


#: megatron's entry points, as imported (install_torch_linear replaces the module attributes)
_megatron_trainable = layers.linear_with_grad_accumulation_and_async_allreduce
_megatron_frozen = layers.linear_with_frozen_weight


def _local(input, weight, bias):
    output = F.linear(input, weight)
    return output if bias is None else output + bias  # megatron adds the bias after the GEMM


def linear_trainable(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                     grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None):
    """megatron's ``linear_with_grad_accumulation_and_async_allreduce`` (same signature)."""
    if (allreduce_dgrad or sequence_parallel or grad_output_buffer is not None or async_grad_allreduce is not None
            or bias is not None):
        return _megatron_trainable(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                   sequence_parallel, grad_output_buffer, wgrad_deferral_limit,
                                   async_grad_allreduce, tp_group)
    return _local(input, weight, bias)


#: megatron's function reads and sets this on the module attribute (its once-only warnings)
linear_trainable.warned = False


def linear_frozen(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, tp_group,
                  grad_output_buffer=None, wgrad_deferral_limit=None, async_grad_allreduce=None):
    """megatron's ``linear_with_frozen_weight`` (same signature)."""
    if (allreduce_dgrad or sequence_parallel or grad_output_buffer is not None or async_grad_allreduce is not None
            or (bias is not None and bias.requires_grad)):  # megatron gives such a bias no gradient
        return _megatron_frozen(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                                tp_group, grad_output_buffer, wgrad_deferral_limit, async_grad_allreduce)
    return _local(input, weight, bias)


def install_torch_linear() -> None:
    """Point megatron's linear entry points at the functions and subclasses above (idempotent;
    CPU only)."""
    layers.LinearWithGradAccumulationAndAsyncCommunication = _TrainableLinear
    layers.LinearWithFrozenWeight = _FrozenLinear
    layers.linear_with_grad_accumulation_and_async_allreduce = linear_trainable
    layers.linear_with_frozen_weight = linear_frozen

