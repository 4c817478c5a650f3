"""The training step under context parallelism: the model sees this CP rank's share of each
micro batch; the loss sees the whole micro batch.

Every CP rank of a data-parallel replica loads the same micro batches (the loader shards rows by
megatron's data-parallel rank, which excludes CP). The model runs on this rank's load-balanced
chunks (megatron_mft.data.cp_shard). Its per-token CE is all-gathered over the CP group back
into sequence order, and the loss function runs unchanged on the whole micro batch: every
statistic, task-aware mode, focal pre-pass and balancer is then exact for any CP size, with no
per-mode reduction. Each CP rank returns 1/cp of the share: the gather's backward sums the CP
ranks' gradients (reduce-scatter), so each rank's tokens get exactly the whole loss's gradient,
and megatron's DDP sums parameter gradients over DP x CP. Reports stay whole per rank and are
summed over the data-parallel group without CP, as at CP=1.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from megatron_mft.data.cp_shard import gather_order, seg_lens_of, shard_batch
from megatron_mft.model.cp_attention import gather_sequence


def cp_size() -> int:
    return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def local_batch(batch: dict, packed: bool) -> dict:
    """This CP rank's part of ``batch`` (the batch itself at CP=1)."""
    cp = cp_size()
    return batch if cp == 1 else shard_batch(batch, cp, ps.get_context_parallel_rank(), packed)


def whole_token_ce(local_ce: torch.Tensor, batch: dict, packed: bool) -> torch.Tensor:
    """Per-token CE of this rank's tokens -> [b, s] of the whole micro batch (autograd-exact)."""
    cp = cp_size()
    if cp == 1:
        return local_ce.reshape(batch["tokens"].shape)
    perm = torch.from_numpy(gather_order(seg_lens_of(batch, packed), cp)).to(local_ce.device)
    full = gather_sequence(local_ce.reshape(-1), ps.get_context_parallel_group()).index_select(0, perm)
    return full.reshape(batch["tokens"].shape)
