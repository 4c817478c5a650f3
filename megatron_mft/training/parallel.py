"""Initialise torch.distributed and megatron's parallel state for a run."""

from __future__ import annotations


import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_mft.compat import Environment, megatron_fixes
from megatron_mft.config import ParallelConfig
from megatron_mft.errors import UsageError


def init_parallel(parallel: ParallelConfig, env: Environment, seed: int) -> None:
    """Process group (NCCL on CUDA, gloo on CPU) + megatron model-parallel groups + RNG."""
    if not torch.distributed.is_initialized():
        from megatron_mft.launch.env import init_distributed, read_dist_env

        init_distributed(read_dist_env(), backend="nccl" if env.cuda else "gloo")
    problems = parallel.world_problems(torch.distributed.get_world_size())
    if problems:  # the preflight check reports these before any process group exists
        raise UsageError("; ".join(problems))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_stages,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    megatron_fixes.skip_one_rank_tp_regions()  # identity autograd nodes of TP = 1 (any device)


def teardown(after_error: bool = False) -> None:
    """End megatron's groups and the process group. After an error under NCCL the other ranks may
    sit in a collective this rank never joins, and destroying the group can then wait forever (no
    message, no exit for srun's --kill-on-bad-exit): the group is aborted instead. gloo is always
    destroyed: left up, its threads abort the interpreter at exit (pytorch#190489)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if not torch.distributed.is_initialized():
        return
    if after_error and torch.distributed.get_backend() == "nccl":
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
        return
    torch.distributed.destroy_process_group()
