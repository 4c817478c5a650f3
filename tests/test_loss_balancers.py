"""Convergence balancers on synthetic validation-loss histories."""

from __future__ import annotations

import json
import math
import os
import random

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from megatron_mft.config.loss import LossConfig
from megatron_mft.loss import CoBaBalancer, FAMOBalancer, NoBalancer, build_balancer, task_weights_in_force

RATES = [0.004, 0.0025, 0.0005, 0.0015]  # task 2 converges slowest


def curves(step: int, rng: random.Random, rates=RATES) -> dict[int, float]:
    """Validation losses falling at steady, different rates (plus a little noise)."""
    return {i: 2.0 * math.exp(-r * step) + rng.gauss(0.0, 0.002) for i, r in enumerate(rates)}


def drive(bal, steps, seed=0, fn=curves):
    rng = random.Random(seed)
    for step in steps:
        bal.update(step, fn(step, rng))
    return bal


@pytest.mark.parametrize("kind", ["coba", "famo"])
def test_slowest_converging_task_gets_the_largest_weight(kind):
    cfg = LossConfig(balancer=kind, balancer_warmup=50, coba_history=10)
    bal = build_balancer(cfg, len(RATES))
    drive(bal, range(0, 50, 10))
    assert torch.equal(bal.weights(), torch.ones(len(RATES), dtype=torch.float64))  # warm-up: uniform
    drive(bal, range(50, 400, 10), seed=1)
    w = bal.weights()
    assert int(w.argmax()) == 2, w
    assert w.mean().item() == pytest.approx(1.0)


def test_coba_turns_weight_away_from_a_diverging_task():
    def fn(step, rng):
        out = curves(step, rng)
        if step > 200:  # task 2 starts to overfit: its validation loss rises
            out[2] = 2.0 * math.exp(-RATES[2] * 200) + 0.004 * (step - 200)
        return out

    bal = drive(CoBaBalancer(4, history=10), range(0, 201, 10), fn=fn)
    before = bal.weights()
    assert int(before.argmax()) == 2
    drive(bal, range(210, 400, 10), fn=fn)
    after = bal.weights()
    assert int(after.argmin()) == 2, after
    assert bal.last_scores["df"] < 0.05  # the divergence factor hands control to ACS


def test_coba_floor_bounds_every_weight():
    bal = drive(CoBaBalancer(4, history=5, floor=0.2), range(0, 300, 10))
    assert float(bal.weights().min()) >= 0.2 - 1e-12  # floor/N of mean-1 weights = 0.2


@pytest.mark.parametrize("kind", ["none", "coba", "famo"])
def test_state_dict_round_trip_and_determinism(kind):
    cfg = LossConfig(balancer=kind, balancer_warmup=20, coba_history=8)
    a = drive(build_balancer(cfg, 4), range(0, 150, 10))
    state = json.loads(json.dumps(a.state_dict()))  # plain data: survives any checkpoint format
    b = build_balancer(cfg, 4)
    b.load_state_dict(state)
    assert torch.equal(a.weights(), b.weights())
    rng_a, rng_b = random.Random(5), random.Random(5)
    for step in range(150, 300, 10):
        a.update(step, curves(step, rng_a))
        b.update(step, curves(step, rng_b))
        assert torch.equal(a.weights(), b.weights())  # bit-identical, as on every rank
    c = drive(build_balancer(cfg, 4), range(0, 150, 10))  # another "rank", same inputs
    assert c.state_dict() == state
    with pytest.raises(ValueError):
        build_balancer(cfg, 3).load_state_dict(state)


def test_missing_tasks_keep_their_last_value_and_factory():
    assert isinstance(build_balancer(LossConfig(balancer="none"), 3), NoBalancer)
    assert isinstance(build_balancer(LossConfig(balancer="coba"), 3), CoBaBalancer)
    assert isinstance(build_balancer(LossConfig(balancer="famo"), 3), FAMOBalancer)
    bal = FAMOBalancer(3)
    bal.update(0, {0: 1.0, 1: 1.0, 2: 1.0})
    bal.update(10, {0: 0.5})  # tasks 1 and 2 not evaluated: no change recorded for them
    assert bal.last == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError):
        bal.update(20, {7: 1.0})
    w = task_weights_in_force(LossConfig(task_weights={"b": 2.0}), ["a", "b", "c"], bal)
    assert torch.allclose(w, bal.weights() * torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Independent float64 references of the papers' arithmetic, checked at every update.
# numpy only (least squares by numpy.polyfit, softmax by exp), nothing shared with balancers.py.

def _np_softmax(x):
    import numpy as np

    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


class CoBaReference:
    """CoBa (Gong et al. 2024, arXiv 2410.06741, section 3), as docs/losses.md states it.

    l_i = validation loss / its first value; alpha_i = least-squares slope of l_i over the last M
    validation points; beta = the same slope of max_i l_i.
      RCS_i = softmax_i(N alpha_i / sum_j |alpha_j|)
      ACS_i = softmax_i(-K alpha_i / sum_k |alpha_i^(k)|), over the K <= M latest slope vectors
      DF    = min(1, t softmax_k(-tau t beta^(k) / sum_k |beta^(k)|)_t), over all t slopes so far
      w     = softmax(N (DF RCS + (1 - DF) ACS)), mixed with uniform: (1 - floor) w + floor / N
    returned times N. The paper's min(1, .) on DF is kept (MFTCoder's code omits it); the floor
    mix is applied always (MFTCoder's code applies 1/(10N) only when a weight falls below it)."""

    def __init__(self, n, warmup, history, tau, floor):
        self.n, self.warmup, self.M, self.tau, self.floor = n, warmup, history, tau, floor
        self.points, self.first, self.slopes, self.betas = [], None, [], []
        self.w, self.scores = [1.0] * n, None

    def update(self, step, losses):
        import numpy as np

        if self.first is None:
            self.first = list(losses)
        self.points = (self.points + [(step, [v / f for v, f in zip(losses, self.first)])])[-self.M:]
        if len(self.points) < 2:
            return
        x = np.array([p[0] for p in self.points], dtype=np.float64)
        y = np.array([p[1] for p in self.points], dtype=np.float64)  # [points, n]
        alpha = np.array([np.polyfit(x, y[:, i], 1)[0] for i in range(self.n)])
        self.betas.append(np.polyfit(x, y.max(axis=1), 1)[0])
        self.slopes = (self.slopes + [alpha])[-self.M:]
        if step < self.warmup:
            return
        n, K, t = self.n, len(self.slopes), len(self.betas)
        rcs = _np_softmax(n * alpha / np.abs(alpha).sum())
        acs = _np_softmax(-K * alpha / np.abs(np.array(self.slopes)).sum(axis=0))
        b = np.array(self.betas)
        df = min(1.0, t * _np_softmax(-self.tau * t * b / np.abs(b).sum())[-1])
        w = _np_softmax(n * (df * rcs + (1 - df) * acs))
        self.w = list(n * ((1 - self.floor) * w + self.floor / n))
        self.scores = (rcs, acs, df)


def _noisy_curves(step, rng):
    # different rates, one task turning upward halfway: DF, RCS and ACS all move
    out = curves(step, rng)
    if step > 150:
        out[1] = 2.0 * math.exp(-RATES[1] * 150) + 0.002 * (step - 150) + rng.gauss(0.0, 0.002)
    return out


@pytest.mark.parametrize("history,tau,floor,warmup", [(10, 5.0, 0.1, 40), (4, 1.0, 0.0, 0), (30, 5.0, 0.2, 0)])
def test_coba_equals_the_float64_reference_at_every_update(history, tau, floor, warmup):
    bal = CoBaBalancer(4, warmup=warmup, history=history, tau=tau, floor=floor)
    ref = CoBaReference(4, warmup, history, tau, floor)
    rng = random.Random(3)
    checked = 0
    for step in range(0, 400, 10):
        losses = _noisy_curves(step, rng)
        bal.update(step, losses)
        ref.update(step, [losses[i] for i in range(4)])
        assert bal.weights().tolist() == pytest.approx(ref.w, rel=1e-12, abs=1e-12), step
        if ref.scores is not None:
            rcs, acs, df = ref.scores
            assert bal.last_scores["rcs"] == pytest.approx(list(rcs), rel=1e-12, abs=1e-15), step
            assert bal.last_scores["acs"] == pytest.approx(list(acs), rel=1e-12, abs=1e-15), step
            assert bal.last_scores["df"] == pytest.approx(df, rel=1e-12, abs=1e-15), step
            checked += 1
    assert checked >= 25
    assert 0.0 < bal.last_scores["df"] < 1.0 or history == 4  # DF between its limits on the rising curve


def test_coba_scores_of_exact_linear_curves_by_hand():
    """l_0 = 1 - 0.01 s, l_1 = 1 - 0.02 s at s = 0, 1, 2: alpha = (-0.01, -0.02) exactly, beta =
    -0.01 (task 0 is the max), both updates equal: RCS = softmax(2 alpha / 0.03) =
    softmax(-2/3, -4/3); ACS (K = 2 equal slopes) = softmax_i(-2 alpha_i / (2 |alpha_i|)) =
    softmax(1, 1); DF = min(1, 2 softmax(-5 * 2 beta / (2 |beta|))_2) = min(1, 2 * 1/2) = 1."""
    bal = CoBaBalancer(2, history=3, tau=5.0, floor=0.0)
    for s in (0, 1, 2):
        bal.update(s, {0: 2.0 * (1 - 0.01 * s), 1: 4.0 * (1 - 0.02 * s)})  # first values 2 and 4
    e1, e2 = math.exp(-2 / 3), math.exp(-4 / 3)
    rcs = [e1 / (e1 + e2), e2 / (e1 + e2)]
    assert bal.last_scores["rcs"] == pytest.approx(rcs, rel=1e-9)
    assert bal.last_scores["acs"] == pytest.approx([0.5, 0.5], rel=1e-9)
    assert bal.last_scores["df"] == pytest.approx(1.0, rel=1e-12)
    f0, f1 = math.exp(2 * rcs[0]), math.exp(2 * rcs[1])
    assert bal.weights().tolist() == pytest.approx([2 * f0 / (f0 + f1), 2 * f1 / (f0 + f1)], rel=1e-9)


class FAMOReference:
    """FAMO's logit update (Liu et al. 2023, Algorithm 1; the authors' code: Adam on the logits
    with weight_decay = gamma, gradient = autograd of softmax(xi) against delta), in float64
    with torch.optim.Adam, with delta = Eq. 4's c_i = (L_prev - L_now) / L_prev (docs/losses.md;
    the FAMO paper uses log L_prev - log L_now, its first-order equal). Weights N softmax(xi)."""

    def __init__(self, n, warmup, lr, weight_decay):
        self.n, self.warmup = n, warmup
        self.xi = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.xi], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        self.prev = None

    def update(self, step, losses):
        prev, self.prev = self.prev, torch.tensor(losses, dtype=torch.float64)
        if step < self.warmup or prev is None:
            return
        delta = (prev - self.prev) / (prev + 1e-8)
        (grad,) = torch.autograd.grad(torch.softmax(self.xi, -1), self.xi, grad_outputs=delta)
        self.opt.zero_grad()
        self.xi.grad = grad
        self.opt.step()

    def weights(self):
        return (self.n * torch.softmax(self.xi.detach(), -1)).tolist()


@pytest.mark.parametrize("lr,weight_decay,warmup", [(0.025, 1e-3, 30), (0.1, 0.0, 0), (0.01, 0.05, 0)])
def test_famo_equals_the_float64_reference_at_every_update(lr, weight_decay, warmup):
    bal = FAMOBalancer(4, warmup=warmup, lr=lr, weight_decay=weight_decay)
    ref = FAMOReference(4, warmup, lr, weight_decay)
    rng = random.Random(4)
    for step in range(0, 400, 10):
        losses = _noisy_curves(step, rng)
        bal.update(step, losses)
        ref.update(step, [losses[i] for i in range(4)])
        assert bal.xi == pytest.approx(ref.xi.detach().tolist(), rel=1e-10, abs=1e-14), step
        assert bal.weights().tolist() == pytest.approx(ref.weights(), rel=1e-12), step
    assert max(bal.weights().tolist()) > 1.01  # the weights moved
