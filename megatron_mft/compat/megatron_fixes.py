"""Fixes for megatron-core 0.16 code paths taken when neither Apex nor Transformer Engine is
installed (any device). Applied by ``setup_runtime`` only in that case. Plus one shortcut for any
installation, installed by ``init_parallel``: ``skip_one_rank_tp_regions``.

* DistributedOptimizer, 'fully_reshardable' load: torch's Adam keeps a per-parameter ``step``
  tensor that the checkpoint does not carry per parameter (megatron restores it from the param
  groups first), yet ``_set_main_param_and_optimizer_states`` copies every key of the live state
  from the loaded tensors and raises ``KeyError: 'step'``. We pass the already-restored step
  through unchanged.
* The same load assigns one shared ``step`` tensor to every parameter's state; torch's
  foreach Adam then increments it once per parameter per step, corrupting the bias correction
  after a resume. We give each parameter its own copy.
* Gradient clipping and the grad norm fall back to megatron's Python stand-ins for Apex's
  multi-tensor kernels: a norm per tensor gathered through ``torch.tensor(list of tensors)``
  and a ``dst.copy_(src * scale)`` per tensor. When the source and destination lists are the
  same tensors (clipping), the scale becomes one in-place ``torch._foreach_mul_``; the norm of
  CPU tensors takes ``torch._foreach_norm`` and ``torch.stack``. Same kernels per tensor on the
  CPU (torch's CPU foreach ops loop over the single-tensor ops), so the same bits; about half
  the Python per call. CUDA tensors keep megatron's norm (the fused foreach norm sums in
  another order); their scale gets the fused foreach kernel (element-wise: the same values).
"""

from __future__ import annotations

import torch

_applied = False


def _multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale, _loop=None):
    src, dst = tensor_lists
    if len(src) == len(dst) and all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        _loop(chunk_size, noop_flag, tensor_lists, scale)


def _multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args, _loop=None):
    tensors = [t for tl in tensor_lists for t in tl]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return _loop(chunk_size, noop_flag, tensor_lists, per_tensor, *args)
    # megatron: torch.norm(torch.tensor([[torch.norm(t) for t in tl] for tl in tensor_lists]))
    norm = torch.norm(torch.stack(torch._foreach_norm(tensors)))
    return torch.tensor([float(norm)], dtype=torch.float), None


#: megatron's tensor-parallel region functions as the linear layers import them; the
#: one-rank shortcut below is switched off by False (paired measurements: tools/bench/engine_parts.py)
one_rank_tp_shortcut = True


def _one_rank_identity(region):
    """``region`` (megatron's copy-to / reduce-from / scatter-to / gather-from tensor-parallel
    region, each an autograd Function that is the identity in both directions over one rank)
    skipped over a one-rank group: one autograd node and ~20 us of Python less per linear layer
    and direction; the same tensor values."""
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    def run(input_, group=None):
        if one_rank_tp_shortcut and get_tensor_model_parallel_group_if_none(group).size() == 1:
            # what autograd hands back for a Function's unmodified input: a view with recomputed
            # strides (a size-1 dim's stride can change, and with it the GEMM path downstream)
            return input_.view_as(input_)
        return region(input_, group=group)

    run.__wrapped__ = region
    return run


def skip_one_rank_tp_regions() -> None:
    """Install _one_rank_identity for the region functions that megatron's parallel linear and
    embedding layers call (any device; once per process)."""
    from megatron.core.tensor_parallel import layers

    for name in ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                 "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region"):
        fn = getattr(layers, name)
        if not hasattr(fn, "__wrapped__"):
            setattr(layers, name, _one_rank_identity(fn))


def _foreach_multi_tensor_stand_ins() -> None:
    from functools import partial

    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = partial(_multi_tensor_scale, _loop=utils.local_multi_tensor_scale)
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = partial(_multi_tensor_l2_norm, _loop=utils.local_multi_tensor_l2_norm)


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_states_keeping_step(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param, {})
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_keeping_step

    original_load = dopt.DistributedOptimizer.load_state_dict

    def _load_with_private_steps(self, state_dict):
        out = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
        return out

    dopt.DistributedOptimizer.load_state_dict = _load_with_private_steps
    _foreach_multi_tensor_stand_ins()
    _applied = True
