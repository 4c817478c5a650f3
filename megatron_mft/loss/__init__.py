"""Task-aware balanced losses (MFTCoder section 3.5), exact over the global batch.

Per step::

    stats = GlobalBatchStats.gather(micro_batches, num_tasks, group=dp_group)
    weights = task_weights_in_force(cfg.loss, task_names, balancer)
    # focal-task exact only: FocalTaskStats from a no-grad forward, .all_reduce(dp_group)
    for each micro batch, inside megatron's loss_func:
        loss_share, report = micro_batch_loss(token_ce, batch, stats, cfg.loss,
                                              num_tasks=..., task_weights=weights, ...)
    # sum gradients, no 1/num_microbatches, no 1/dp scaling
    metrics = task_metrics(sum_reports(reports, group=dp_group), task_names, weights)

Formulas and exactness argument: docs/losses.md.
"""

from megatron_mft.loss.balancers import (
    BALANCERS,
    Balancer,
    CoBaBalancer,
    FAMOBalancer,
    NoBalancer,
    build_balancer,
)
from megatron_mft.loss.modes import MODES, micro_batch_loss
from megatron_mft.loss.report import sum_reports, task_metrics
from megatron_mft.loss.stats import FocalTaskStats, GlobalBatchStats, check_micro_batch
from megatron_mft.loss.weights import resolve_alpha, task_vector, task_weights_in_force

__all__ = [
    "BALANCERS", "Balancer", "CoBaBalancer", "FAMOBalancer", "FocalTaskStats", "GlobalBatchStats",
    "MODES", "NoBalancer", "build_balancer", "check_micro_batch", "micro_batch_loss", "resolve_alpha",
    "sum_reports", "task_metrics", "task_vector", "task_weights_in_force",
]
