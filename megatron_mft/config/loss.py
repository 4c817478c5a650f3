"""Loss mode and convergence balancer. Owned by megatron_mft.loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class LossConfig:
    #: token | sample | task-token (Eq. 1) | task-sample | focal-sample (Eq. 2) | focal-task (Eq. 3)
    mode: Literal["token", "sample", "task-token", "task-sample", "focal-sample", "focal-task"] = "task-token"
    #: Focal exponent gamma (focal modes).
    gamma: float = 0.0
    #: Per-task focal alpha, by task name (missing tasks: 1.0).
    alpha: dict[str, float] = field(default_factory=dict)
    #: Static per-task weights on top of any mode, by task name (missing tasks: 1.0).
    task_weights: dict[str, float] = field(default_factory=dict)
    #: focal-task only. exact: a no-grad pre-pass over the global batch computes P_i, Q_i
    #: (one extra forward per step). one-pass: P_i, Q_i from the micro batch itself; the
    #: step's objective then depends on how the batch is split.
    focal_task_exact: bool = True
    #: Convergence balancer: none | famo | coba.
    balancer: Literal["none", "famo", "coba"] = "none"
    #: Update the balancer every N steps.
    balancer_interval: int = 10
    #: Steps of uniform weights before the balancer starts.
    balancer_warmup: int = 0

    def validate(self) -> list[str]:
        p = []
        if self.gamma < 0:
            p.append("loss.gamma: must be >= 0")
        for k, v in {**self.alpha, **self.task_weights}.items():
            if v < 0:
                p.append(f"loss.alpha/task_weights[{k}]: must be >= 0")
        if self.balancer_interval < 1:
            p.append("loss.balancer_interval: must be >= 1")
        return p
