"""One optimizer step (and validation passes) through megatron-core's pipeline schedules.

The loss of a micro batch is its exact share of the global-batch objective (see
megatron_mft.loss), so gradients are summed over micro batches and data-parallel ranks:
``calculate_per_token_loss=True`` stops the schedule's 1/num_microbatches, and
``finalize_model_grads`` is called without a token count so nothing rescales the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_mft.loss import FocalTaskStats, GlobalBatchStats, micro_batch_loss, task_metrics
from megatron_mft.model import build_packed_seq_params
from megatron_mft.training.context_parallel import cp_size, local_batch, whole_token_ce


@dataclass
class StepContext:
    loss_cfg: object
    task_names: list
    device: torch.device
    packed: bool
    task_weights: Optional[torch.Tensor] = None
    #: train.stage: sft | dpo | orpo (the preference stages: megatron_mft.training.preference)
    stage: str = "sft"
    #: dpo: the reference log-prob source (megatron_mft.training.reference)
    reference: Optional[object] = None
    #: rows consumed before this step (the precomputed reference looks its rows up by it)
    consumed_rows: int = 0
    #: MoE: router-loss scaling and per-expert load (megatron_mft.model.moe.RouterLoad)
    router: Optional[object] = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


def _finalize_sum(model, num_tokens, *args, **kwargs):
    """megatron's grad finalisation (DP/TP/PP reductions) without the 1/num_tokens rescale."""
    return finalize_model_grads(model, None, *args, **kwargs)


def install_grad_finalizer(chunks: list) -> None:
    for c in chunks:
        c.config.finalize_model_grads_func = _finalize_sum
        c.config.no_sync_func = [m.no_sync for m in chunks] if len(chunks) > 1 else chunks[0].no_sync
        c.config.grad_sync_func = None


def model_inputs(batch: dict, ctx: StepContext) -> dict:
    """Batch -> GPTModel keyword arguments: THD (packed) or SBHD (one sample per row)."""
    dev = ctx.device
    tokens, labels, pos = (batch[k].to(dev, non_blocking=True) for k in ("tokens", "labels", "position_ids"))
    if ctx.packed:
        return dict(input_ids=tokens.reshape(1, -1), position_ids=pos.reshape(1, -1), attention_mask=None,
                    labels=labels.reshape(1, -1),
                    packed_seq_params=build_packed_seq_params(batch["cu_seqlens"], int(batch["max_seqlen"]), dev))
    return dict(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels)


def _batch_on_device(batch: dict, device) -> dict:
    """Tensors to ``device`` (asynchronous from the loader's pinned memory), except ``cu_seqlens``:
    the packed-sequence plan is read from it on the host (a device copy would be read back, a sync
    per micro batch) and ``build_packed_seq_params`` moves it itself."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "cu_seqlens" else v)
            for k, v in batch.items()}


def _loss_func(ctx: StepContext, stats, focal_stats, batch: dict, output_tensor: torch.Tensor):
    token_ce = output_tensor.float().reshape(batch["tokens"].shape)
    share, report = micro_batch_loss(token_ce, batch, stats, ctx.loss_cfg, num_tasks=ctx.num_tasks,
                                     task_weights=ctx.task_weights, focal_task_stats=focal_stats,
                                     task_names=ctx.task_names)
    # megatron's schedule sums the middle value for finalize_model_grads' 1/num_tokens, which
    # _finalize_sum does not apply: the shares are already exact parts of the global loss.
    return share, torch.zeros([], dtype=torch.int), report


def _ce_only_loss_func(batch: dict, output_tensor: torch.Tensor):
    """Validation / statistics passes: hand back per-token CE, no objective."""
    token_ce = output_tensor.float().reshape(batch["tokens"].shape).detach()
    return token_ce.sum() * 0, torch.zeros([], dtype=torch.int), {"token_ce": token_ce, "batch": batch}


def _forward_step(ctx: StepContext, loss_factory: Callable, data_iterator, model):
    batch = _batch_on_device(next(data_iterator), ctx.device)
    out = model(**model_inputs(local_batch(batch, ctx.packed), ctx))
    if cp_size() > 1:  # the loss sees the whole micro batch (training/context_parallel.py)
        return out, partial(_context_parallel_loss, ctx.packed, loss_factory, batch)
    return out, partial(loss_factory, batch)


def _context_parallel_loss(packed: bool, loss_factory: Callable, batch: dict, output_tensor: torch.Tensor):
    loss, num_tokens, report = loss_factory(batch, whole_token_ce(output_tensor.float(), batch, packed))
    return loss / cp_size(), num_tokens, report


def run_schedule(chunks: list, micro_batches: list[dict], ctx: StepContext, loss_factory: Callable,
                 forward_only: bool) -> list:
    """Run megatron's forward(-backward) schedule over ``micro_batches``; returns the per-micro-batch
    reports (non-empty only on the last pipeline stage)."""
    shape = micro_batches[0]["tokens"].shape
    seq = shape[0] * shape[1] if ctx.packed else max(mb["tokens"].shape[1] for mb in micro_batches)
    if ctx.packed and cp_size() > 1 and ps.get_pipeline_model_parallel_world_size() > 1:
        # CP pads each packed sample to a multiple of 2 x cp, so a row may outgrow seq_length and
        # micro batches differ in width: megatron's p2p then sends each activation's shape first
        get_model_config(chunks[0]).variable_seq_lengths = True
    mbs = 1 if ctx.packed else shape[0]
    iters = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, ctx, loss_factory),
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def _broadcast_from_last_stage(vec: torch.Tensor) -> torch.Tensor:
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(vec, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return vec


def reduce_report_vector(vec: torch.Tensor) -> torch.Tensor:
    """Sum a per-rank report vector over DP, then give every pipeline stage the last stage's."""
    torch.distributed.all_reduce(vec, group=ps.get_data_parallel_group())
    return _broadcast_from_last_stage(vec)


def train_step(chunks: list, optimizer, scheduler, micro_batches: list[dict], ctx: StepContext) -> dict:
    """Forward/backward over this rank's micro batches of the global batch, then one optimizer step."""
    if ctx.stage != "sft":
        from megatron_mft.training.preference import preference_train_step

        return preference_train_step(chunks, optimizer, scheduler, micro_batches, ctx)
    dp = ps.get_data_parallel_group()
    stats = GlobalBatchStats.gather(micro_batches, ctx.num_tasks, group=dp)
    focal_stats = None
    if ctx.loss_cfg.mode == "focal-task" and ctx.loss_cfg.focal_task_exact:
        focal_stats = focal_prepass(chunks, micro_batches, ctx)
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    if ctx.router is not None:  # router losses once per step, outside the task weighting
        ctx.router.begin_step(len(micro_batches))
    reports = run_schedule(chunks, micro_batches, ctx, partial(_loss_func, ctx, stats, focal_stats),
                           forward_only=False)
    router = ctx.router.end_step(len(micro_batches)) if ctx.router is not None else {}
    T = ctx.num_tasks
    vec = torch.zeros(2 * T + 1, dtype=torch.float64, device=ctx.device)
    for r in reports:  # only the last pipeline stage has reports
        vec[0] += r["objective"].to(vec)
        vec[1:T + 1] += r["task_ce_sum"].to(vec)
        vec[T + 1:] += r["task_tokens"].to(vec)
    vec = reduce_report_vector(vec).cpu()  # the same on every rank, so all ranks skip together
    ok, grad_norm, nonfinite = step_if_finite(optimizer, loss_finite=bool(torch.isfinite(vec[0])))
    if ok:  # as Megatron-LM: a skipped update does not advance the LR schedule
        scheduler.step(increment=1)
    summed = {"objective": vec[0], "task_ce_sum": vec[1:T + 1], "task_tokens": vec[T + 1:]}
    return {**task_metrics(summed, ctx.task_names, ctx.task_weights),
            "grad_norm": None if grad_norm is None else float(grad_norm), "update_ok": bool(ok),
            "nonfinite": nonfinite, "lr": optimizer.param_groups[0]["lr"], **router}


def step_if_finite(optimizer, loss_finite: bool) -> tuple[bool, Optional[float], bool]:
    """megatron's optimizer step (ChainedOptimizer.step's sequence: prepare, global grad norm,
    clip by it, update) that skips the update when the loss or the grad norm is not finite: an
    fp32/bf16 megatron optimizer would otherwise write NaN into every weight. Returns (updated,
    grad norm, skipped for a non-finite value)."""
    if optimizer.prepare_grads():  # a loss scaler found inf/nan: it skips and adjusts itself
        return False, None, False
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_finite and math.isfinite(grad_norm)):
        return False, grad_norm, True
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm, False


def focal_prepass(chunks: list, micro_batches: list[dict], ctx: StepContext):
    """Exact focal-task: a no-grad forward over the global batch gives the per-task P_i, Q_i."""
    with torch.no_grad():
        reports = run_schedule(chunks, micro_batches, ctx, _ce_only_loss_func, forward_only=True)
    stats = FocalTaskStats(ctx.num_tasks)
    for r in reports:  # last pipeline stage only: the only stage that computes the loss
        stats.accumulate(r["token_ce"], r["batch"])
    return stats.all_reduce(ps.get_data_parallel_group())


def evaluate(chunks: list, micro_batches: list[dict], ctx: StepContext) -> tuple[float, float]:
    """Token-mean CE over (this rank's shard of) one task's validation micro batches, summed over
    DP; returns (ce_sum, tokens) identical on every rank."""
    vec = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    if micro_batches:
        with torch.no_grad():
            reports = run_schedule(chunks, micro_batches, ctx, _ce_only_loss_func, forward_only=True)
        for r in reports:
            mask = r["batch"]["loss_mask"].to(r["token_ce"].device)
            vec[0] += (r["token_ce"].double() * mask).sum()
            vec[1] += mask.sum()
    vec = reduce_report_vector(vec)
    return vec[0].item(), vec[1].item()
