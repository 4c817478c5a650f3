"""The loss modes: one micro batch's share of the global-batch objective.

Contract (docs/architecture.md, "The loss contract"): summing ``loss_share`` over every micro
batch of the step and every data-parallel rank gives exactly the chosen formula over the
whole global batch, in value and in gradient. This works because every normaliser of the
formulas (token counts, sample counts, number of tasks, weighted sums of those) is a global
statistic known from the data before the forward pass (``GlobalBatchStats``), and each
formula is then a sum of per-token or per-sample terms divided by those constants. The one
exception, focal-task (Eq. 3), is non-linear in global per-task statistics; see
``_focal_task`` and docs/losses.md.

Notation in the code: w_i static/balancer weight of task i, T_i = sum_j T_ij loss tokens of
task i, M_i samples of task i (all global); T_s loss tokens of sample s (local: a sample never
spans micro batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_mft.loss.layout import Layout, build_layout, per_task_sum
from megatron_mft.loss.stats import FocalTaskStats, GlobalBatchStats
from megatron_mft.loss.weights import resolve_alpha

#: floor of (1 - P) inside (1 - P)^gamma: keeps the gradient finite when gamma < 1 and P -> 1
_TINY = 1e-30


def _inv(x: torch.Tensor) -> torch.Tensor:
    """1/x where x > 0, else 0 (absent tasks, empty batches, zero weights)."""
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-300), torch.zeros_like(x))


def _pad(v: torch.Tensor) -> torch.Tensor:
    """[num_tasks] -> [num_tasks + 1] with 0 for the dummy task of non-loss positions."""
    return torch.cat([v, v.new_zeros(1)])


@dataclass
class _Ctx:
    ce: torch.Tensor  # [b*s] token CE, 0 on non-loss positions (grad flows to loss positions)
    lay: Layout
    w: torch.Tensor  # float64 [nt] weights
    alpha: torch.Tensor  # float64 [nt]
    T: torch.Tensor  # float64 [nt] global loss tokens per task
    M: torch.Tensor  # float64 [nt] global samples per task
    gamma: float
    exact: bool
    focal: Optional[FocalTaskStats]

    @property
    def dtype(self) -> torch.dtype:
        return self.ce.dtype

    def per_token(self, table: torch.Tensor) -> torch.Tensor:
        """Gather a float64 per-task table [nt] to the tokens (0 on non-loss positions)."""
        return _pad(table).to(self.dtype)[self.lay.tok_task]

    def per_slot(self, table: torch.Tensor) -> torch.Tensor:
        return _pad(table).to(self.dtype)[self.lay.slot_task]

    def slot_sum(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.lay.n_slots, dtype=values.dtype, device=values.device).index_add(
            0, self.lay.slot, values
        )

    def sample_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_s, Q_s) per sample slot: mean p and mean log p over the sample's loss tokens."""
        p = torch.where(self.lay.mask, torch.exp(-self.ce), torch.zeros_like(self.ce))
        cnt = self.lay.slot_tokens.clamp_min(1)
        return self.slot_sum(p) / cnt, self.slot_sum(-self.ce) / cnt

    def task_weight_norm(self) -> torch.Tensor:
        """w_i / sum_{i present} w_i (0 for absent tasks)."""
        present = (self.T > 0).to(self.w.dtype)
        return self.w * present * _inv((self.w * present).sum())


def _token(c: _Ctx) -> torch.Tensor:
    # sum_t w_i(t) ce_t / sum_i w_i T_i
    coef = c.per_token(c.w * _inv((c.w * c.T).sum()))
    return torch.dot(c.ce, coef)


def _sample(c: _Ctx) -> torch.Tensor:
    # sum_s w_i(s) mean_s(ce) / sum_i w_i M_i
    coef = c.per_token(c.w * _inv((c.w * c.M).sum())) / c.lay.slot_tokens.clamp_min(1)[c.lay.slot]
    return torch.dot(c.ce, coef)


def _task_token(c: _Ctx) -> torch.Tensor:
    # Eq. 1: sum_i c_i (sum_{j,k} ce_ijk / T_i), c_i = w_i / sum_{i present} w_i
    coef = c.per_token(c.task_weight_norm() * _inv(c.T))
    return torch.dot(c.ce, coef)


def _task_sample(c: _Ctx) -> torch.Tensor:
    # sum_i c_i (1/M_i) sum_j mean_ij(ce)
    coef = c.per_token(c.task_weight_norm() * _inv(c.M)) / c.lay.slot_tokens.clamp_min(1)[c.lay.slot]
    return torch.dot(c.ce, coef)


def _focal_sample(c: _Ctx) -> torch.Tensor:
    # Eq. 2: sum_s w_i(s) [-alpha_i (1 - P_s)^gamma Q_s] / sum_i w_i M_i
    P_s, Q_s = c.sample_means()
    coef = c.per_slot(c.alpha * c.w * _inv((c.w * c.M).sum()))
    return torch.dot(coef, -((1.0 - P_s).clamp_min(_TINY) ** c.gamma) * Q_s)


def _focal_task(c: _Ctx) -> torch.Tensor:
    """Eq. 3: sum_i c_i f_i(P_i, Q_i), f_i = -alpha_i (1 - P_i)^gamma Q_i, P_i/Q_i global means.

    exact: P_i, Q_i come from ``FocalTaskStats`` (no-grad pre-pass over the global batch).
    P_i and Q_i are linear in the per-sample means, so the gradient of sum_i c_i f_i is that of
    the linear surrogate sum_i c_i (a_i sum_j P_ij + b_i sum_j Q_ij) / M_i with the fixed
    coefficients a_i = df/dP_i, b_i = df/dQ_i; this micro batch contributes its samples' part
    of the sums. Its value is replaced (without touching the gradient) by its share
    c_i f_i m_i / M_i of the exact value, m_i = its samples of task i, so the shares add up to
    exactly L3 in value too.

    one-pass: f_i evaluated at this micro batch's own means P_i^mb, Q_i^mb, weighted by
    m_i / M_i; exact for gamma = 0 or a task inside a single micro batch.
    """
    P_s, Q_s = c.sample_means()
    live = c.lay.slot_live.to(c.dtype)
    nt = c.lay.num_tasks
    SP = per_task_sum(P_s * live, c.lay.slot_task, nt)[:nt]
    SQ = per_task_sum(Q_s * live, c.lay.slot_task, nt)[:nt]
    m = per_task_sum(live, c.lay.slot_task, nt)[:nt].to(torch.float64)
    cw = c.task_weight_norm() * _inv(c.M)  # c_i / M_i, float64
    if c.exact:
        P, Q = (x.to(c.w.device) for x in (c.focal.P, c.focal.Q))
        one_minus = (1.0 - P).clamp_min(_TINY)
        f = -c.alpha * one_minus**c.gamma * Q
        dfdP = c.alpha * c.gamma * one_minus ** (c.gamma - 1.0) * Q if c.gamma != 0 else torch.zeros_like(P)
        dfdQ = -c.alpha * one_minus**c.gamma
        surrogate = (SP * (cw * dfdP).to(c.dtype)).sum() + (SQ * (cw * dfdQ).to(c.dtype)).sum()
        value = (cw * f * m).sum().to(c.dtype)
        return surrogate - surrogate.detach() + value
    inv_m = _inv(m).to(c.dtype)
    P_mb, Q_mb = SP * inv_m, SQ * inv_m
    f_mb = -c.alpha.to(c.dtype) * (1.0 - P_mb).clamp_min(_TINY) ** c.gamma * Q_mb
    return (f_mb * (cw * m).to(c.dtype)).sum()


#: mode name -> share function; the registry the config's ``loss.mode`` selects from.
MODES: dict[str, Callable[[_Ctx], torch.Tensor]] = {
    "token": _token,
    "sample": _sample,
    "task-token": _task_token,
    "task-sample": _task_sample,
    "focal-sample": _focal_sample,
    "focal-task": _focal_task,
}


def micro_batch_loss(
    token_ce: torch.Tensor,
    batch: dict,
    stats: GlobalBatchStats,
    cfg,
    *,
    num_tasks: int,
    task_weights: Optional[torch.Tensor] = None,
    focal_task_stats: Optional[FocalTaskStats] = None,
    alpha: Optional[torch.Tensor] = None,
    task_names: Optional[Sequence[str]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro batch's share of the step's loss, and a report to sum over micro batches/ranks.

    token_ce: [b, s] per-token cross entropy -log p (megatron's vocab-parallel CE output);
      values at non-loss positions are ignored (may be anything, even NaN).
    batch: the micro-batch dict (needs loss_mask, task_ids, sample_ids).
    stats: ``GlobalBatchStats.gather`` of the whole step (all micro batches, DP-reduced).
    cfg: ``LossConfig`` (mode, gamma, focal_task_exact, ...).
    task_weights: [num_tasks] weights in force (static x balancer: ``task_weights_in_force``);
      None = all 1 (an error if ``cfg.task_weights`` is set, so it cannot be forgotten).
    focal_task_stats: required by focal-task with ``cfg.focal_task_exact``.
    alpha: [num_tasks] focal alpha; default from ``cfg.alpha`` by ``task_names``, else 1.

    Returns (loss_share, report). loss_share is a scalar of token_ce's float type (>= fp32)
    with grad; sum it over micro batches and DP ranks, no further normalisation. report holds
    detached float64 tensors to sum the same way: ``task_ce_sum`` [nt] (sum of CE over the
    task's loss tokens), ``task_tokens`` [nt], ``task_samples`` [nt] and ``objective`` (the
    share's value: its sum is the step's true objective).
    """
    if cfg.mode not in MODES:
        raise ValueError(f"loss.mode: {cfg.mode!r} is not one of {', '.join(MODES)}")
    if stats.num_tasks != num_tasks:
        raise ValueError(f"stats has {stats.num_tasks} tasks, num_tasks = {num_tasks}")
    exact = cfg.mode == "focal-task" and cfg.focal_task_exact
    if exact and focal_task_stats is None:
        raise ValueError(
            "focal-task with loss.focal_task_exact needs focal_task_stats (FocalTaskStats from a "
            "no-grad pre-pass); or set loss.focal_task_exact=false for the one-pass approximation"
        )
    if exact and not torch.equal(focal_task_stats.task_samples, stats.task_samples):
        raise ValueError(
            "FocalTaskStats and GlobalBatchStats count different samples per task: the pre-pass "
            "must cover exactly this step's micro batches and be all-reduced over the same group"
        )
    if task_weights is None and cfg.task_weights:
        raise ValueError("loss.task_weights is set: pass task_weights=task_weights_in_force(cfg, task_names, balancer)")
    dev = token_ce.device
    dtype = torch.promote_types(token_ce.dtype, torch.float32)
    lay = build_layout(batch, num_tasks, dev, dtype)
    ce = token_ce.reshape(-1).to(dtype)
    ce = torch.where(lay.mask, ce, torch.zeros_like(ce))
    if alpha is None:
        alpha = resolve_alpha(cfg, task_names, num_tasks)
    f64 = dict(device=dev, dtype=torch.float64)
    w = torch.ones(num_tasks, **f64) if task_weights is None else task_weights.to(**f64).reshape(num_tasks)
    a = torch.ones(num_tasks, **f64) if alpha is None else alpha.to(**f64).reshape(num_tasks)
    T, M = stats.on(dev)
    ctx = _Ctx(ce, lay, w, a, T, M, float(cfg.gamma), exact, focal_task_stats)
    share = MODES[cfg.mode](ctx)
    with torch.no_grad():
        ce_d = ce.detach().to(torch.float64)
        report = {
            "task_ce_sum": per_task_sum(ce_d, lay.tok_task, num_tasks)[:num_tasks],
            "task_tokens": per_task_sum(lay.mask.to(torch.float64), lay.tok_task, num_tasks)[:num_tasks],
            "task_samples": per_task_sum(lay.slot_live.to(torch.float64), lay.slot_task, num_tasks)[:num_tasks],
            "objective": share.detach().to(torch.float64),
        }
    return share, report
