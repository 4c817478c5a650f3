"""Per-token bookkeeping of one micro batch: which tokens take loss, their sample and task.

Everything here is sync-free on the device (no ``.item()``, no boolean indexing), so it can
run inside megatron's ``loss_func`` on the GPU without stalling the pipeline. Samples are
addressed by ``sample_ids`` directly: ``sample_ids < b*s`` always holds (a sample owns at
least one position), so a buffer of ``b*s + 1`` slots fits every sample plus one dummy slot
that collects the non-loss positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    """Flattened view of one micro batch, on the device of the loss computation."""

    #: bool [b*s]: the position takes loss (loss_mask > 0 and it belongs to a sample).
    mask: torch.Tensor
    #: int64 [b*s]: sample slot of each position; non-loss positions go to the dummy slot.
    slot: torch.Tensor
    #: int64 [b*s]: task of each position; non-loss positions get the dummy task ``num_tasks``.
    tok_task: torch.Tensor
    #: int64 [n_slots]: task of each sample slot (dummy task for slots without loss tokens).
    slot_task: torch.Tensor
    #: float [n_slots]: loss tokens per slot (the dummy slot counts 0).
    slot_tokens: torch.Tensor
    #: bool [n_slots]: the slot is a sample with at least one loss token.
    slot_live: torch.Tensor
    num_tasks: int

    @property
    def n_slots(self) -> int:
        return self.slot.numel() + 1


def build_layout(batch: dict, num_tasks: int, device: torch.device, dtype: torch.dtype) -> Layout:
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).reshape(-1)
    sample_ids = batch["sample_ids"].to(device, non_blocking=True).reshape(-1)
    task_ids = batch["task_ids"].to(device, non_blocking=True).reshape(-1)
    n = sample_ids.numel()
    mask = (loss_mask > 0) & (sample_ids >= 0) & (task_ids >= 0)
    slot = torch.where(mask, sample_ids, n)
    tok_task = torch.where(mask, task_ids, num_tasks)
    slot_task = torch.full((n + 1,), num_tasks, dtype=torch.int64, device=device)
    # every loss token of a sample carries the same task id, so amax just picks it
    slot_task.scatter_reduce_(0, slot, tok_task, reduce="amax", include_self=False)
    slot_task[n] = num_tasks
    slot_tokens = torch.zeros(n + 1, dtype=dtype, device=device).index_add_(0, slot, mask.to(dtype))
    slot_live = slot_tokens > 0
    return Layout(mask, slot, tok_task, slot_task, slot_tokens, slot_live, num_tasks)


def per_task_sum(values: torch.Tensor, index: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum ``values`` into ``num_tasks + 1`` bins (the last one is the dummy task)."""
    return torch.zeros(num_tasks + 1, dtype=values.dtype, device=values.device).index_add_(0, index, values)
