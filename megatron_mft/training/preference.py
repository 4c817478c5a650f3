"""The preference stages' optimizer step (train.stage dpo | orpo) on the SFT engine.

Same schedules, DDP, optimizer and grad finalisation as ``step.train_step``; only the loss
differs (megatron_mft.loss.preference): pair counts are gathered over the global batch before
the forward, dpo first attaches each micro batch's reference log-probs (``ctx.reference``),
and each micro batch returns its exact share of the global preference objective. MoE router
losses count once per step and are logged as in sft (``ctx.router``, docs/moe.md).
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as ps

from megatron_mft.errors import UsageError
from megatron_mft.loss.preference import REPORT_ROWS, PreferenceStats, preference_loss, preference_metrics
from megatron_mft.training.step import StepContext, reduce_report_vector, run_schedule, step_if_finite

STAGES = ("sft", "dpo", "orpo")


def _loss_func(ctx: StepContext, stats: PreferenceStats, batch: dict, output_tensor: torch.Tensor):
    token_ce = output_tensor.float().reshape(batch["tokens"].shape)
    share, report = preference_loss(token_ce, batch, stats, ctx.loss_cfg, stage=ctx.stage, num_tasks=ctx.num_tasks,
                                    task_weights=ctx.task_weights, ref_logps=batch.get("ref_logps"))
    return share, torch.zeros([], dtype=torch.int), report


def preference_train_step(chunks: list, optimizer, scheduler, micro_batches: list[dict], ctx: StepContext) -> dict:
    T, R = ctx.num_tasks, len(REPORT_ROWS)
    stats = PreferenceStats.gather(micro_batches, T, group=ps.get_data_parallel_group())
    if ctx.stage == "dpo":
        ctx.reference.attach(chunks, micro_batches, ctx)
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    if ctx.router is not None:  # MoE router losses once per step, outside the preference objective (as sft)
        ctx.router.begin_step(len(micro_batches))
    reports = run_schedule(chunks, micro_batches, ctx, partial(_loss_func, ctx, stats), forward_only=False)
    router = ctx.router.end_step(len(micro_batches)) if ctx.router is not None else {}
    vec = torch.zeros(1 + R * T, dtype=torch.float64, device=ctx.device)
    for r in reports:  # last pipeline stage only
        vec[0] += r["objective"].to(vec)
        vec[1:] += r["preference"].reshape(-1).to(vec)
    vec = reduce_report_vector(vec).cpu()
    ok, grad_norm, nonfinite = step_if_finite(optimizer, loss_finite=bool(torch.isfinite(vec[0])))
    if ok:
        scheduler.step(increment=1)
    metrics = preference_metrics(float(vec[0]), vec[1:].reshape(R, T), ctx.task_names, ctx.task_weights)
    return {**metrics, "grad_norm": None if grad_norm is None else float(grad_norm), "update_ok": bool(ok),
            "nonfinite": nonfinite, "lr": optimizer.param_groups[0]["lr"], **router}


def stage_problems(run, manifest: dict) -> list[str]:
    """The stage, the loss mode and the data must agree (checked once the data is open)."""
    stage = run.train.stage
    pairs = manifest.get("mode") == "preference"
    where = run.data.path
    if stage == "sft":
        return [f"train.stage sft: {where} holds preference pairs (mode preference); set train.stage dpo or orpo"] \
            if pairs else []
    p = []
    if not pairs:
        p.append(f"train.stage {stage}: {where} is not preference data (mode {manifest.get('mode')!r}); preprocess "
                 f"{{chosen, rejected}} pairs with --mode preference (or data.mode=preference online)")
    if getattr(run.parallel, "cp", 1) > 1:  # the pair shares are not divided over CP ranks (step._loss_func is)
        p.append(f"parallel.cp {run.parallel.cp}: the preference stages do not support context parallelism yet")
    if stage == "dpo" and run.loss.preference.reference == "frozen" and run.peft.method != "none":
        p.append(f"loss.preference.reference frozen: for full fine-tuning only; with peft.method {run.peft.method} "
                 f"the reference is the same model with its adapters disabled (no copy needed)")
    if run.loss.mode.startswith("focal"):
        p.append(f"loss.mode {run.loss.mode}: the preference stages take token, sample, task-token or task-sample")
    return p


def check_stage(run, manifest: dict) -> None:
    p = stage_problems(run, manifest)
    if p:
        raise UsageError("; ".join(p))
