"""Per-task metrics from the summed ``micro_batch_loss`` reports."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mft.loss.stats import _reduce_device


def sum_reports(reports: Iterable[dict], group=None) -> dict[str, torch.Tensor]:
    """Sum report dicts of this rank's micro batches, then over ``group`` (DP; None = no reduce).

    One all-reduce for all keys. Returns float64 CPU tensors.
    """
    reports = list(reports)
    if not reports:
        return {}
    keys = sorted(reports[0])
    flat = torch.cat([sum(r[k].detach().to(torch.float64).cpu().reshape(-1) for r in reports) for k in keys])
    if group is not None:
        buf = flat.to(_reduce_device(group))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        flat = buf.cpu()
    out, i = {}, 0
    for k in keys:
        n = reports[0][k].numel()
        out[k] = flat[i : i + n].reshape(reports[0][k].shape)
        i += n
    return out


def task_metrics(
    report: dict[str, torch.Tensor], task_names: Sequence[str], weights: Optional[torch.Tensor] = None
) -> dict[str, float]:
    """{"loss": objective, "task_loss/<name>": token-mean CE, "task_tokens/<name>": count,
    "task_weight/<name>": weight in force (when ``weights`` is given)}.

    ``report`` is the sum over the step (``sum_reports``). task_loss is the plain token mean of
    CE over the task's loss tokens whatever the mode, so it compares across modes; a task with no
    loss token in the step has no task_loss entry.
    """
    out: dict[str, float] = {}
    if "objective" in report:
        out["loss"] = float(report["objective"])
    ce, tok = report["task_ce_sum"], report["task_tokens"]
    for i, name in enumerate(task_names):
        if float(tok[i]) > 0:
            out[f"task_loss/{name}"] = float(ce[i]) / float(tok[i])
        out[f"task_tokens/{name}"] = int(round(float(tok[i])))
    if weights is not None:
        for i, name in enumerate(task_names):
            out[f"task_weight/{name}"] = float(weights[i])
    return out
