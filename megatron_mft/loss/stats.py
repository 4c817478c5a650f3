"""Statistics of the whole global batch that the loss needs before (or beside) the forward pass.

``GlobalBatchStats`` comes from the data alone: per-task loss-token counts and sample counts,
summed over every micro batch of the step and over the data-parallel group. The loss modes
divide by these, which is what makes the sum of the micro-batch shares the formula over the
whole global batch.

``FocalTaskStats`` comes from a no-grad forward over the global batch: per-task sums of the
per-sample means of p and of log p, giving P_i and Q_i of Eq. 3 for the exact focal-task mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mft.loss.layout import build_layout


def _reduce_device(group) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (and no group) works on the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum a float64 tensor over ``group``; ``group=None`` means this rank alone. Returns CPU."""
    if group is None:
        return t.cpu()
    buf = t.to(_reduce_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.cpu()


def check_micro_batch(batch: dict, num_tasks: int, where: str = "micro batch") -> None:
    """Check the parts of the micro-batch contract the loss relies on; raise ValueError."""
    for key in ("loss_mask", "task_ids", "sample_ids"):
        if key not in batch:
            raise ValueError(f"{where}: missing key {key!r}")
    shape = batch["loss_mask"].shape
    if batch["task_ids"].shape != shape or batch["sample_ids"].shape != shape:
        raise ValueError(f"{where}: loss_mask, task_ids and sample_ids must have the same shape")
    sid = batch["sample_ids"].reshape(-1).long().cpu()
    tid = batch["task_ids"].reshape(-1).long().cpu()
    lm = batch["loss_mask"].reshape(-1).cpu() > 0
    n = sid.numel()
    if n and (int(sid.min()) < -1 or int(sid.max()) >= n):
        raise ValueError(f"{where}: sample_ids must be in [-1, b*s)")
    if n and (int(tid.min()) < -1 or int(tid.max()) >= num_tasks):
        raise ValueError(f"{where}: task_ids must be in [-1, {num_tasks})")
    if bool((lm & ((sid < 0) | (tid < 0))).any()):
        raise ValueError(f"{where}: loss_mask > 0 on a position with sample_ids or task_ids = -1")
    # one task per sample
    real = sid >= 0
    if bool(real.any()):
        s, t = sid[real], tid[real]
        hi = torch.full((n,), -2, dtype=torch.int64).scatter_reduce(0, s, t, "amax", include_self=False)
        lo = torch.full((n,), -2, dtype=torch.int64).scatter_reduce(0, s, t, "amin", include_self=False)
        if not torch.equal(hi, lo):
            raise ValueError(f"{where}: a sample spans more than one task id")


@dataclass
class _FlatStep:
    """Every micro batch of a step as one flat sequence on the CPU, sample ids offset per micro
    batch so that a slot is one (micro batch, sample). One pass over the step instead of one per
    micro batch: ~60 small torch ops per micro batch were most of the statistics' cost."""

    loss: torch.Tensor  # bool [n]: loss_mask > 0
    sid: torch.Tensor  # int64 [n]: sample_ids as given
    tid: torch.Tensor  # int64 [n]: task_ids
    offset: torch.Tensor  # int64 [n]: first position of the position's micro batch
    size: torch.Tensor  # int64 [n]: size of the position's micro batch

    @classmethod
    def of(cls, micro_batches: list[dict]) -> "_FlatStep":
        def flat(key):
            return torch.cat([mb[key].reshape(-1).cpu() for mb in micro_batches])

        sizes = torch.tensor([mb["sample_ids"].numel() for mb in micro_batches])
        starts = sizes.cumsum(0) - sizes
        return cls(flat("loss_mask") > 0, flat("sample_ids").long(), flat("task_ids").long(),
                   torch.repeat_interleave(starts, sizes), torch.repeat_interleave(sizes, sizes))

    @property
    def n(self) -> int:
        return self.sid.numel()

    def contract_holds(self, num_tasks: int) -> bool:
        """check_micro_batch's value rules over the whole step at once."""
        sid, tid = self.sid, self.tid
        bad = (sid < -1) | (sid >= self.size) | (tid < -1) | (tid >= num_tasks) | (self.loss & ((sid < 0) | (tid < 0)))
        if bool(bad.any()):
            return False
        slot = torch.where(sid >= 0, sid + self.offset, self.n)  # one task per sample
        hi = torch.full((self.n + 1,), -2, dtype=torch.int64).scatter_reduce(0, slot, tid, "amax", include_self=False)
        lo = torch.full((self.n + 1,), -2, dtype=torch.int64).scatter_reduce(0, slot, tid, "amin", include_self=False)
        return torch.equal(hi[: self.n], lo[: self.n])

    def task_counts(self, num_tasks: int) -> torch.Tensor:
        """float64 [2, num_tasks]: loss tokens and samples with >= 1 loss token per task (exact
        integers: the order of the sums does not matter)."""
        mask = self.loss & (self.sid >= 0) & (self.tid >= 0)
        tok_task = torch.where(mask, self.tid, num_tasks)
        slot_task = torch.full((self.n + 1,), num_tasks, dtype=torch.int64).scatter_reduce_(
            0, torch.where(mask, self.sid + self.offset, self.n), tok_task, reduce="amax", include_self=False)
        slot_task[self.n] = num_tasks  # the dummy slot of the non-loss positions
        return torch.stack([torch.bincount(tok_task, minlength=num_tasks + 1)[:num_tasks],
                            torch.bincount(slot_task, minlength=num_tasks + 1)[:num_tasks]]).to(torch.float64)


def _keys_and_shapes_hold(micro_batches: list[dict]) -> bool:
    for mb in micro_batches:
        if any(key not in mb for key in ("loss_mask", "task_ids", "sample_ids")):
            return False
        shape = mb["loss_mask"].shape
        if mb["task_ids"].shape != shape or mb["sample_ids"].shape != shape:
            return False
    return True


@dataclass
class GlobalBatchStats:
    """Per-task loss-token and sample counts of one global batch (all micro batches, all DP ranks).

    All tensors are float64 on the CPU, shape ``[num_tasks]``; device copies are cached.
    """

    #: sum_j T_ij: loss tokens of task i in the global batch.
    task_tokens: torch.Tensor
    #: M_i: samples of task i with at least one loss token.
    task_samples: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tasks(self) -> int:
        return self.task_tokens.numel()

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(task_tokens, task_samples) as float64 tensors on ``device`` (cached)."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.task_tokens.to(device), self.task_samples.to(device))
        return self._cache[key]

    @classmethod
    def gather(cls, micro_batches: list[dict], num_tasks: int, group=None, check: bool = True) -> "GlobalBatchStats":
        """Count this rank's micro batches, then sum over ``group`` (the data-parallel group).

        Call once per step, before the forward passes, with every micro batch of the step on
        this rank. A sample is a distinct (micro batch, sample_ids value) with at least one
        loss token; its task is its task_ids value. ``check`` validates the micro-batch
        contract (cheap, CPU).
        """
        if not micro_batches:
            counts = torch.zeros(2, num_tasks, dtype=torch.float64)
        else:
            flat = _FlatStep.of(micro_batches) if not check or _keys_and_shapes_hold(micro_batches) else None
            if check and (flat is None or not flat.contract_holds(num_tasks)):
                for k, mb in enumerate(micro_batches):  # names the micro batch and the broken rule
                    check_micro_batch(mb, num_tasks, where=f"micro batch {k}")
            counts = (flat or _FlatStep.of(micro_batches)).task_counts(num_tasks)
        counts = _all_reduce_sum(counts, group)
        return cls(task_tokens=counts[0].clone(), task_samples=counts[1].clone())


class FocalTaskStats:
    """P_i and Q_i of Eq. 3 over the global batch, from a no-grad forward (exact focal-task mode).

    Usage per step::

        fts = FocalTaskStats(num_tasks)
        with torch.no_grad():
            for mb in micro_batches:            # this rank's micro batches
                fts.accumulate(token_ce_of(mb), mb)
        fts.all_reduce(dp_group)

    then pass ``focal_task_stats=fts`` to every ``micro_batch_loss`` call of the step. The
    forward of the pre-pass must match the training forward (same parameters, no dropout),
    otherwise the coefficients belong to a slightly different point.
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        #: float64 [3, num_tasks] on the CPU after all_reduce: sum_j P_ij, sum_j Q_ij, M_i.
        self.sums = torch.zeros(3, num_tasks, dtype=torch.float64)
        self._acc: Optional[torch.Tensor] = None  # device accumulator, no sync per micro batch
        self.reduced = False

    @torch.no_grad()
    def accumulate(self, token_ce: torch.Tensor, batch: dict) -> None:
        dtype = torch.promote_types(token_ce.dtype, torch.float32)
        ce = token_ce.detach().reshape(-1).to(dtype)
        lay = build_layout(batch, self.num_tasks, ce.device, dtype)
        ce0 = torch.where(lay.mask, ce, torch.zeros_like(ce))
        p = torch.where(lay.mask, torch.exp(-ce0), torch.zeros_like(ce0))
        n = lay.n_slots
        cnt = lay.slot_tokens.clamp_min(1)
        P_s = torch.zeros(n, dtype=dtype, device=ce.device).index_add_(0, lay.slot, p) / cnt
        Q_s = torch.zeros(n, dtype=dtype, device=ce.device).index_add_(0, lay.slot, -ce0) / cnt
        vals = torch.stack([P_s, Q_s, lay.slot_live.to(dtype)]).double()
        if self._acc is None:
            self._acc = torch.zeros(3, self.num_tasks + 1, dtype=torch.float64, device=ce.device)
        self._acc.index_add_(1, lay.slot_task, vals)

    def all_reduce(self, group=None) -> "FocalTaskStats":
        """Sum over ``group`` (the data-parallel group; None = this rank alone). Call once."""
        if self.reduced:
            raise RuntimeError("FocalTaskStats.all_reduce called twice")
        local = self._acc[:, : self.num_tasks] if self._acc is not None else self.sums
        self.sums = _all_reduce_sum(local.contiguous(), group)
        self._acc = None
        self.reduced = True
        return self

    def _reduced_sums(self) -> torch.Tensor:
        if not self.reduced:
            raise RuntimeError("FocalTaskStats: call all_reduce(group) first (group=None for one rank)")
        return self.sums

    @property
    def task_samples(self) -> torch.Tensor:
        return self._reduced_sums()[2]

    @property
    def P(self) -> torch.Tensor:
        """float64 [num_tasks]: P_i = (1/M_i) sum_j P_ij (0 for absent tasks)."""
        s = self._reduced_sums()
        return s[0] / s[2].clamp_min(1)

    @property
    def Q(self) -> torch.Tensor:
        """float64 [num_tasks]: Q_i = (1/M_i) sum_j Q_ij, Q_ij the mean log p (0 for absent tasks)."""
        s = self._reduced_sums()
        return s[1] / s[2].clamp_min(1)
