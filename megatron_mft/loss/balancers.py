"""Convergence balancers: per-task loss weights driven by per-task validation losses.

Common interface (a Protocol, no base class):

    balancer.update(step, val_losses)   # {task id: token-mean validation CE} measured at `step`
    balancer.weights()                  # float64 [num_tasks], mean 1; uniform during warm-up
    balancer.state_dict() / load_state_dict(state)   # plain python data, survives resume

The trainer calls ``update`` every ``loss.balancer_interval`` steps after a validation pass
and multiplies ``weights()`` into the static task weights (``task_weights_in_force``). All
arithmetic is float64 on the CPU from the given numbers only, so every rank that passes the
same (all-reduced) validation losses gets bit-identical weights. A task missing from
``val_losses`` keeps its last value.

- ``none``: all ones.
- ``coba``: CoBa (Gong et al. 2024, arXiv 2410.06741), from the slopes of the per-task
  validation-loss histories.
- ``famo``: FAMO (Liu et al. 2023) on validation losses, the MFTCoder paper's Eq. 4.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class Balancer(Protocol):
    num_tasks: int

    def update(self, step: int, val_losses: Mapping[int, float]) -> None: ...

    def weights(self) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.to(torch.float64), dim=-1)


def _slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y against x (0 with fewer than two points)."""
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        return 0.0
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx


def _merge(last: list[float] | None, num_tasks: int, val_losses: Mapping[int, float]) -> list[float]:
    cur = list(last) if last is not None else [math.nan] * num_tasks
    for k, v in val_losses.items():
        k = int(k)
        if not 0 <= k < num_tasks:
            raise ValueError(f"val_losses: task id {k} out of range [0, {num_tasks})")
        cur[k] = float(v)
    return cur


class NoBalancer:
    """Uniform weights (ones)."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    def update(self, step: int, val_losses: Mapping[int, float]) -> None:
        pass

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_tasks, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"kind": "none", "num_tasks": self.num_tasks}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "none", self.num_tasks)


def _check_state(state: dict, kind: str, num_tasks: int) -> None:
    if state.get("kind") != kind or state.get("num_tasks") != num_tasks:
        raise ValueError(
            f"balancer state is {state.get('kind')!r} for {state.get('num_tasks')} tasks; "
            f"this run uses {kind!r} for {num_tasks} tasks"
        )


class CoBaBalancer:
    """CoBa: weights from the slopes of the normalised per-task validation-loss histories.

    At each update, with l_i the validation loss of task i divided by its first value:
    - alpha_i: least-squares slope of l_i over the last ``history`` validation points (in steps);
    - RCS (relative convergence score) = softmax_i(N alpha_i / sum_j |alpha_j|): the task whose
      loss falls slowest (alpha least negative) gets the most;
    - ACS (absolute convergence score) = softmax_i(-K alpha_i / sum_k |alpha_i^(k)|) over the
      task's own last K slopes: a task whose slope turned positive (diverging) gets the least;
    - DF (divergence factor) = min(1, K softmax_k(-tau K beta^(k) / sum |beta|)_last), beta the
      slope of max_i l_i (the worst task's curve) and k over all K updates so far: near 1
      while the worst curve still falls as fast as before, towards 0 when it flattens or rises;
    - weights = softmax_i(N (DF RCS_i + (1 - DF) ACS_i)), then mixed with the uniform
      distribution so each is at least ``floor``/N; returned times N (mean 1).
    Uniform before ``warmup`` steps and until two validation points exist.
    """

    def __init__(self, num_tasks: int, warmup: int = 0, history: int = 20, tau: float = 5.0, floor: float = 0.1):
        self.num_tasks, self.warmup, self.history, self.tau, self.floor = num_tasks, warmup, history, tau, floor
        self.steps: list[float] = []  # steps of the kept validation points
        self.losses: list[list[float]] = []  # normalised losses at those steps
        self.first: list[float] = [math.nan] * num_tasks
        self.last: list[float] | None = None
        self.task_slopes: list[list[float]] = []  # last `history` slope vectors
        self.worst_slopes: list[float] = []  # every slope of the worst curve so far
        self._w = [1.0] * num_tasks
        self.last_scores: dict = {}  # rcs, acs, df of the latest update (for logging)

    def update(self, step: int, val_losses: Mapping[int, float]) -> None:
        self.last = _merge(self.last, self.num_tasks, val_losses)
        for i, v in enumerate(self.last):
            if math.isnan(self.first[i]) and not math.isnan(v) and v > 0:
                self.first[i] = v
        norm = [v / f if not (math.isnan(v) or math.isnan(f)) else 1.0 for v, f in zip(self.last, self.first)]
        self.steps = (self.steps + [float(step)])[-self.history :]
        self.losses = (self.losses + [norm])[-self.history :]
        if len(self.steps) < 2:
            return
        alpha = [_slope(self.steps, [l[i] for l in self.losses]) for i in range(self.num_tasks)]
        beta = _slope(self.steps, [max(l) for l in self.losses])
        self.task_slopes = (self.task_slopes + [alpha])[-self.history :]
        self.worst_slopes.append(beta)  # whole run: DF compares today's slope with all before
        if step < self.warmup:
            return
        self._w = self._compute(alpha).tolist()

    def _compute(self, alpha: list[float]) -> torch.Tensor:
        n = self.num_tasks
        a = torch.tensor(alpha, dtype=torch.float64)
        rcs = _softmax(n * a / a.abs().sum()) if a.abs().sum() > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        hist = torch.tensor(self.task_slopes, dtype=torch.float64)  # [K, n]
        k = hist.shape[0]
        denom = hist.abs().sum(0)
        acs = _softmax(torch.where(denom > 0, -k * a / denom.clamp_min(1e-300), torch.zeros_like(a)))
        b = torch.tensor(self.worst_slopes, dtype=torch.float64)
        bsum = b.abs().sum()
        df = 1.0 if bsum == 0 else min(1.0, float(len(b) * _softmax(-self.tau * len(b) * b / bsum)[-1]))
        p = _softmax(n * (df * rcs + (1.0 - df) * acs))
        p = (1.0 - self.floor) * p + self.floor / n
        self.last_scores = {"rcs": rcs.tolist(), "acs": acs.tolist(), "df": df}
        return p * n

    def weights(self) -> torch.Tensor:
        return torch.tensor(self._w, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {
            "kind": "coba", "num_tasks": self.num_tasks, "steps": list(self.steps),
            "losses": [list(l) for l in self.losses], "first": list(self.first),
            "last": None if self.last is None else list(self.last),
            "task_slopes": [list(s) for s in self.task_slopes], "worst_slopes": list(self.worst_slopes),
            "weights": list(self._w),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "coba", self.num_tasks)
        self.steps = list(state["steps"])
        self.losses = [list(l) for l in state["losses"]]
        self.first = list(state["first"])
        self.last = None if state["last"] is None else list(state["last"])
        self.task_slopes = [list(s) for s in state["task_slopes"]]
        self.worst_slopes = list(state["worst_slopes"])
        self._w = list(state["weights"])


class FAMOBalancer:
    """FAMO (Liu et al. 2023) on per-task validation losses, as the MFTCoder paper's Eq. 4 states it.

    Task logits xi, weights w = N softmax(xi) multiply the task losses (g = sum_i w_i grad L_i).
    At each update the relative decrease of each task's validation loss since the previous
    update, c_i = (L_i(prev) - L_i(now)) / (L_i(prev) + eps) (Eq. 4's c_i), drives one Adam step
    (lr, L2 weight decay towards uniform) on xi with gradient J_softmax(xi)^T c: tasks whose
    validation loss fell least gain weight, the max-min of Eq. 4 solved online as FAMO does.
    The first update after warm-up only records the losses.
    """

    def __init__(self, num_tasks: int, warmup: int = 0, lr: float = 0.025, weight_decay: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.num_tasks, self.warmup, self.lr, self.weight_decay = num_tasks, warmup, lr, weight_decay
        self.betas, self.eps = betas, eps
        self.xi = [0.0] * num_tasks
        self.m = [0.0] * num_tasks
        self.v = [0.0] * num_tasks
        self.t = 0
        self.last: list[float] | None = None
        self._w = [1.0] * num_tasks

    def _z(self) -> torch.Tensor:
        return _softmax(torch.tensor(self.xi, dtype=torch.float64))

    def update(self, step: int, val_losses: Mapping[int, float]) -> None:
        prev = self.last
        self.last = _merge(self.last, self.num_tasks, val_losses)
        if step < self.warmup or prev is None:
            return
        cur_t = torch.tensor(self.last, dtype=torch.float64)
        prev_t = torch.tensor(prev, dtype=torch.float64)
        ok = ~(cur_t.isnan() | prev_t.isnan())
        delta = torch.where(ok, (prev_t - cur_t) / (prev_t.abs() + 1e-8), torch.zeros_like(cur_t))
        z = self._z()
        xi = torch.tensor(self.xi, dtype=torch.float64)
        g = z * (delta - (z * delta).sum()) + self.weight_decay * xi  # J_softmax^T c + L2
        b1, b2 = self.betas
        self.t += 1
        m = b1 * torch.tensor(self.m, dtype=torch.float64) + (1 - b1) * g
        v = b2 * torch.tensor(self.v, dtype=torch.float64) + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**self.t), v / (1 - b2**self.t)
        xi = xi - self.lr * mhat / (vhat.sqrt() + self.eps)
        self.xi, self.m, self.v = xi.tolist(), m.tolist(), v.tolist()
        self._w = (self.num_tasks * self._z()).tolist()

    def weights(self) -> torch.Tensor:
        return torch.tensor(self._w, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {
            "kind": "famo", "num_tasks": self.num_tasks, "xi": list(self.xi), "m": list(self.m),
            "v": list(self.v), "t": self.t, "last": None if self.last is None else list(self.last),
            "weights": list(self._w),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "famo", self.num_tasks)
        self.xi, self.m, self.v = list(state["xi"]), list(state["m"]), list(state["v"])
        self.t = int(state["t"])
        self.last = None if state["last"] is None else list(state["last"])
        self._w = list(state["weights"])


#: loss.balancer -> constructor from (cfg, num_tasks)
BALANCERS: dict[str, Callable[..., Balancer]] = {
    "none": lambda cfg, n: NoBalancer(n),
    "coba": lambda cfg, n: CoBaBalancer(
        n, warmup=cfg.balancer_warmup, history=cfg.coba_history, tau=cfg.coba_tau, floor=cfg.coba_floor
    ),
    "famo": lambda cfg, n: FAMOBalancer(n, warmup=cfg.balancer_warmup, lr=cfg.famo_lr, weight_decay=cfg.famo_weight_decay),
}


def build_balancer(cfg, num_tasks: int) -> Balancer:
    """The balancer ``cfg.balancer`` names (``cfg`` is a LossConfig)."""
    if cfg.balancer not in BALANCERS:
        raise ValueError(f"loss.balancer: {cfg.balancer!r} is not one of {', '.join(BALANCERS)}")
    return BALANCERS[cfg.balancer](cfg, num_tasks)
