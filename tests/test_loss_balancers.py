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
