"""Every rank agrees on one small integer: a MAX or MIN all-reduce of a flag or a code.

A decision one rank can reach alone (a failed save, a lock held by another run, a stop signal,
NaN weights) has to be taken by all ranks at the same point: a rank that raised or stopped alone
would leave the others waiting in the next collective for ever. The checkpoint save, the trainer
and the preemption guard all ask through here.

torch is imported only when a process group exists (``launch.signals`` runs before torch is
loaded); without one, the local value is the answer.
"""

from __future__ import annotations

import sys

__all__ = ["agree", "any_rank", "every_rank", "initialised_dist"]


def initialised_dist():
    """torch.distributed if a process group exists, else None (never imports torch itself)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def agree(value: int, op: str = "max", group=None) -> int:
    """``value`` reduced over the ranks of ``group`` (default: the world) with ``op`` ("max" or
    "min"). Collective: every rank of the group must call it at the same point."""
    if op not in ("max", "min"):
        raise ValueError(f"op must be 'max' or 'min', not {op!r}")
    dist = initialised_dist()
    if dist is None:
        return int(value)
    import torch

    nccl = "nccl" in str(dist.get_backend(group))  # NCCL reduces device tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=group)
    return int(flag.item())


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return bool(agree(int(bool(flag)), "max", group))


def every_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on all of them."""
    return bool(agree(int(bool(flag)), "min", group))
