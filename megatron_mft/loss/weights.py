"""Per-task vectors (static weights, focal alpha) from the by-name config maps."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch


def task_vector(values: Mapping[str, float], task_names: Sequence[str], default: float = 1.0) -> torch.Tensor:
    """float64 [len(task_names)] from a {task name: value} map; missing tasks get ``default``.

    A key that names no task raises ValueError (a typo would otherwise be silently ignored).
    """
    names = list(task_names)
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ValueError(f"unknown task name(s) {', '.join(map(repr, unknown))}; tasks: {', '.join(names)}")
    return torch.tensor([float(values.get(n, default)) for n in names], dtype=torch.float64)


def task_weights_in_force(cfg, task_names: Sequence[str], balancer=None) -> torch.Tensor:
    """The weights to pass as ``micro_batch_loss(task_weights=...)``: static weights
    (``cfg.task_weights``) times the balancer's current weights (if any). float64 [num_tasks]."""
    w = task_vector(cfg.task_weights, task_names)
    if balancer is not None:
        w = w * balancer.weights().to(torch.float64)
    return w


def resolve_alpha(cfg, task_names: Optional[Sequence[str]], num_tasks: int) -> Optional[torch.Tensor]:
    """Per-task focal alpha from ``cfg.alpha``; None when the config sets none (all 1)."""
    if not cfg.alpha:
        return None
    if task_names is None:
        raise ValueError("loss.alpha is set by task name: pass task_names= (or alpha=) to micro_batch_loss")
    a = task_vector(cfg.alpha, task_names)
    if a.numel() != num_tasks:
        raise ValueError(f"task_names has {a.numel()} names but num_tasks = {num_tasks}")
    return a
