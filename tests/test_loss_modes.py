"""Every loss mode against the brute-force float64 reference, for any micro-batch / DP split."""

from __future__ import annotations

import os
import sys
from typing import get_args

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch
import torch.nn.functional as F

from megatron_mft.config.loss import LossConfig, LossMode
from megatron_mft.loss import (
    FocalTaskStats,
    GlobalBatchStats,
    check_micro_batch,
    micro_batch_loss,
    sum_reports,
    task_metrics,
    task_weights_in_force,
)
from test_loss_reference import make_rows, random_ce, reference_loss, rows_to_batch, samples_of, split_rows

torch.set_num_threads(1)

MODES = list(get_args(LossMode))  # every mode the config accepts
NT, SEQ, ROWS = 5, 24, 8


def split_loss(rows, ce, cfg, dp, n_mb, weights=None, alpha=None, nt=NT, seq=SEQ):
    """Sum of micro_batch_loss shares over dp simulated ranks x n_mb micro batches.

    Each simulated rank gathers its own stats; the "all-reduce" is the sum of the ranks'
    tensors, exactly what GlobalBatchStats.gather does with a group.
    """
    layout = split_rows(len(rows), dp, n_mb)
    shards = [[rows_to_batch([rows[i] for i in mb], seq) for mb in rank] for rank in layout]
    per_rank = [GlobalBatchStats.gather(mbs, nt) for mbs in shards]
    stats = GlobalBatchStats(
        task_tokens=sum(s.task_tokens for s in per_rank), task_samples=sum(s.task_samples for s in per_rank)
    )
    fts = None
    if cfg.mode == "focal-task" and cfg.focal_task_exact:
        ranks = []
        for rank, mbs in zip(layout, shards):
            f = FocalTaskStats(nt)
            with torch.no_grad():
                for idx, mb in zip(rank, mbs):
                    f.accumulate(ce[idx], mb)
            ranks.append(f.all_reduce(None))
        fts = FocalTaskStats(nt)
        fts.sums, fts.reduced = sum(f.sums for f in ranks), True
    total, reports = 0.0, []
    for rank, mbs in zip(layout, shards):
        for idx, mb in zip(rank, mbs):
            share, rep = micro_batch_loss(
                ce[idx], mb, stats, cfg, num_tasks=nt, task_weights=weights, focal_task_stats=fts, alpha=alpha
            )
            total = total + share
            reports.append(rep)
    return total, reports, stats


def grad_of(fn, leaf):
    leaf.grad = None
    val = fn()
    (g,) = torch.autograd.grad(val, leaf)
    return val.detach(), g


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_reference_for_every_split(mode, weighted):
    rows = make_rows(11, ROWS, SEQ, NT, task_pool=[0, 1, 2, 4])  # task 3 absent everywhere
    ce = random_ce(12, ROWS, SEQ).requires_grad_(True)
    weights = torch.tensor([1.0, 2.5, 0.5, 7.0, 1.5]) if weighted else None
    alpha = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25]) if mode.startswith("focal") else None
    cfg = LossConfig(mode=mode, gamma=2.0 if mode.startswith("focal") else 0.0)
    ref_v, ref_g = grad_of(lambda: reference_loss(rows, ce, mode, NT, weights, alpha, cfg.gamma), ce)
    assert ref_v > 0
    for dp in (1, 2):
        for n_mb in (1, 2, 4):
            v, g = grad_of(lambda: split_loss(rows, ce, cfg, dp, n_mb, weights, alpha)[0], ce)
            assert torch.allclose(v, ref_v, rtol=1e-12, atol=0), (mode, dp, n_mb, v, ref_v)
            assert torch.allclose(g, ref_g, rtol=1e-10, atol=1e-14), (mode, dp, n_mb)


@pytest.mark.parametrize("mode", MODES)
def test_float32_ce_matches_reference(mode):
    rows = make_rows(21, ROWS, SEQ, NT)
    ce64 = random_ce(22, ROWS, SEQ)
    ce = ce64.float().requires_grad_(True)
    cfg = LossConfig(mode=mode, gamma=1.5 if mode.startswith("focal") else 0.0)
    v, g = grad_of(lambda: split_loss(rows, ce, cfg, 2, 2)[0], ce)
    assert v.dtype == torch.float32
    leaf = ce.detach().double().requires_grad_(True)
    ref_v, ref_g = grad_of(lambda: reference_loss(rows, leaf, mode, NT, gamma=cfg.gamma), leaf)
    assert torch.allclose(v.double(), ref_v, rtol=2e-6)
    assert torch.allclose(g.double(), ref_g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_non_loss_positions_are_ignored_even_nan(mode):
    rows = make_rows(31, ROWS, SEQ, NT)
    batch_all = rows_to_batch(rows, SEQ)
    clean = random_ce(32, ROWS, SEQ)
    dirty = clean.clone()
    off = batch_all["loss_mask"] == 0
    dirty[off] = torch.where(torch.rand(int(off.sum())) < 0.5, torch.tensor(float("nan")), torch.tensor(1e30)).double()
    cfg = LossConfig(mode=mode, gamma=2.0 if mode.startswith("focal") else 0.0)
    dirty.requires_grad_(True)
    v, g = grad_of(lambda: split_loss(rows, dirty, cfg, 1, 2)[0], dirty)
    ref = split_loss(rows, clean, cfg, 1, 2)[0]
    assert torch.isfinite(v) and torch.allclose(v, ref, rtol=1e-12)
    assert torch.isfinite(g).all() and (g[off] == 0).all()


def test_gradient_through_logits_matches_reference_all_modes():
    """Gradients w.r.t. a small logit tensor (through cross entropy), 4 micro batches x DP 2."""
    V = 11
    rows = make_rows(41, ROWS, SEQ, NT, task_pool=[0, 2, 3])
    g = torch.Generator().manual_seed(42)
    logits = torch.randn(ROWS, SEQ, V, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, V, (ROWS, SEQ), generator=g)
    for mode in MODES:
        cfg = LossConfig(mode=mode, gamma=0.7 if mode.startswith("focal") else 0.0)

        def ce_of():
            return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(ROWS, SEQ)

        v, gr = grad_of(lambda: split_loss(rows, ce_of(), cfg, 2, 2)[0], logits)
        ref_v, ref_g = grad_of(lambda: reference_loss(rows, ce_of(), mode, NT, gamma=cfg.gamma), logits)
        assert torch.allclose(v, ref_v, rtol=1e-12), mode
        assert torch.allclose(gr, ref_g, rtol=1e-9, atol=1e-15), mode


def test_exact_focal_task_gradient_is_autograd_of_true_L3():
    """The surrogate's gradient equals autograd of L3 computed on the whole batch in float64."""
    rows = make_rows(51, ROWS, SEQ, NT)
    ce = random_ce(52, ROWS, SEQ).requires_grad_(True)
    alpha = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.75])
    for gamma in (0.5, 1.0, 3.0):
        cfg = LossConfig(mode="focal-task", gamma=gamma, focal_task_exact=True)
        ref_v, ref_g = grad_of(lambda: reference_loss(rows, ce, "focal-task", NT, alpha=alpha, gamma=gamma), ce)
        v, g = grad_of(lambda: split_loss(rows, ce, cfg, 2, 4, alpha=alpha)[0], ce)
        assert torch.allclose(v, ref_v, rtol=1e-12)
        assert torch.allclose(g, ref_g, rtol=1e-10, atol=1e-15)


def test_one_pass_focal_task_error_is_nonzero_but_bounded():
    """Stated case (docs/losses.md): 5 tasks, 32 packed rows x 128 tokens (202 samples of 2-9
    tokens, ~10 per task per micro batch), token CE ~ Exp(1), gamma 2, 4 micro batches on one
    rank. Measured: value error 1.5%, gradient error 15% (relative, L2); asserted < 5% / < 30%.
    With one micro batch on one rank the one-pass mode is exact, and so it is for gamma = 0."""
    n_rows, seq = 32, 128
    rows = make_rows(61, n_rows, seq, NT)
    g = torch.Generator().manual_seed(1)
    ce = (-torch.rand(n_rows, seq, generator=g, dtype=torch.float64).log()).requires_grad_(True)
    exact = LossConfig(mode="focal-task", gamma=2.0, focal_task_exact=True)
    one = LossConfig(mode="focal-task", gamma=2.0, focal_task_exact=False)
    ev, eg = grad_of(lambda: split_loss(rows, ce, exact, 1, 4, seq=seq)[0], ce)
    ov, og = grad_of(lambda: split_loss(rows, ce, one, 1, 4, seq=seq)[0], ce)
    rel_v = float((ov - ev).abs() / ev.abs())
    rel_g = float((og - eg).norm() / eg.norm())
    print(f"one-pass focal-task: value rel err {rel_v:.3e}, grad rel err {rel_g:.3e}")
    assert 1e-4 < rel_v < 0.05
    assert 1e-3 < rel_g < 0.30
    single_v, single_g = grad_of(lambda: split_loss(rows, ce, one, 1, 1, seq=seq)[0], ce)
    assert torch.allclose(single_v, ev, rtol=1e-12) and torch.allclose(single_g, eg, rtol=1e-10, atol=1e-15)
    z_one, z_exact = (LossConfig(mode="focal-task", gamma=0.0, focal_task_exact=e) for e in (False, True))
    za = grad_of(lambda: split_loss(rows, ce, z_one, 2, 2, seq=seq)[0], ce)
    zb = grad_of(lambda: split_loss(rows, ce, z_exact, 2, 2, seq=seq)[0], ce)
    assert torch.allclose(za[0], zb[0], rtol=1e-12) and torch.allclose(za[1], zb[1], rtol=1e-10, atol=1e-16)


def test_single_task_task_token_equals_token():
    rows = make_rows(71, ROWS, SEQ, 1)
    ce = random_ce(72, ROWS, SEQ).requires_grad_(True)
    a = grad_of(lambda: split_loss(rows, ce, LossConfig(mode="task-token"), 2, 2, nt=1)[0], ce)
    b = grad_of(lambda: split_loss(rows, ce, LossConfig(mode="token"), 1, 4, nt=1)[0], ce)
    assert torch.allclose(a[0], b[0], rtol=1e-12) and torch.allclose(a[1], b[1], rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("exact", [True, False])
def test_gamma0_alpha1_focal_equals_plain(exact):
    rows = make_rows(81, ROWS, SEQ, NT)
    ce = random_ce(82, ROWS, SEQ).requires_grad_(True)
    pairs = [("focal-sample", "sample"), ("focal-task", "task-sample")]
    for focal, plain in pairs:
        f = grad_of(lambda: split_loss(rows, ce, LossConfig(mode=focal, gamma=0.0, focal_task_exact=exact), 2, 2)[0], ce)
        p = grad_of(lambda: split_loss(rows, ce, LossConfig(mode=plain), 2, 2)[0], ce)
        assert torch.allclose(f[0], p[0], rtol=1e-12) and torch.allclose(f[1], p[1], rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("mode", MODES)
def test_weights_are_scale_free_and_zero_weights_are_safe(mode):
    rows = make_rows(91, ROWS, SEQ, NT)
    ce = random_ce(92, ROWS, SEQ)
    cfg = LossConfig(mode=mode, gamma=1.0 if mode.startswith("focal") else 0.0)
    w = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.0])
    a = split_loss(rows, ce, cfg, 1, 2, weights=w)[0]
    b = split_loss(rows, ce, cfg, 1, 2, weights=w * 13.0)[0]
    assert torch.allclose(a, b, rtol=1e-12)
    z = split_loss(rows, ce, cfg, 1, 2, weights=torch.zeros(NT))[0]
    assert float(z) == 0.0


def test_report_gives_token_mean_ce_per_task_and_objective():
    rows = make_rows(101, ROWS, SEQ, NT, task_pool=[0, 1, 2, 3])
    ce = random_ce(102, ROWS, SEQ)
    names = ["complete", "t2c", "comment", "trans", "unittest"]
    cfg = LossConfig(mode="task-sample", task_weights={"t2c": 2.0})
    w = task_weights_in_force(cfg, names)
    total, reports, stats = split_loss(rows, ce, cfg, 2, 2, weights=w)
    rep = sum_reports(reports)
    m = task_metrics(rep, names, weights=w)
    ref = reference_loss(rows, ce, "task-sample", NT, weights=w)
    assert m["loss"] == pytest.approx(float(ref), rel=1e-12)  # the objective, against the float64 reference
    counted = torch.zeros(NT, dtype=rep["task_samples"].dtype)  # samples with loss tokens, counted by hand
    for task, _ in samples_of(rows, ce):
        counted[task] += 1
    assert torch.equal(rep["task_samples"], counted)
    batch = rows_to_batch(rows, SEQ)
    for i, n in enumerate(names):
        sel = (batch["task_ids"] == i) & (batch["loss_mask"] > 0)
        if sel.any():
            assert m[f"task_loss/{n}"] == pytest.approx(float(ce[sel].mean()), rel=1e-12)
        else:
            assert f"task_loss/{n}" not in m
        assert m[f"task_tokens/{n}"] == int(sel.sum())
    assert m["task_weight/t2c"] == 2.0 and "task_loss/unittest" not in m
    assert int((stats.task_tokens > 0).sum()) == 4  # tasks present


def test_alpha_by_task_name():
    rows = make_rows(111, ROWS, SEQ, 3)
    ce = random_ce(112, ROWS, SEQ)
    names = ["a", "b", "c"]
    cfg = LossConfig(mode="focal-sample", gamma=1.0, alpha={"b": 3.0})
    batch = rows_to_batch(rows, SEQ)
    stats = GlobalBatchStats.gather([batch], 3)
    v, _ = micro_batch_loss(ce, batch, stats, cfg, num_tasks=3, task_names=names)
    ref = reference_loss(rows, ce, "focal-sample", 3, alpha=[1.0, 3.0, 1.0], gamma=1.0)
    assert torch.allclose(v, ref, rtol=1e-12)
    with pytest.raises(ValueError, match="task_names"):
        micro_batch_loss(ce, batch, stats, cfg, num_tasks=3)
    with pytest.raises(ValueError, match="unknown task"):
        micro_batch_loss(ce, batch, stats, LossConfig(mode="focal-sample", alpha={"x": 1.0}), num_tasks=3, task_names=names)


def test_misuse_is_reported():
    rows = make_rows(121, 2, SEQ, 2)
    batch = rows_to_batch(rows, SEQ)
    ce = random_ce(122, 2, SEQ)
    stats = GlobalBatchStats.gather([batch], 2)
    with pytest.raises(ValueError, match="focal_task_stats"):
        micro_batch_loss(ce, batch, stats, LossConfig(mode="focal-task", gamma=1.0), num_tasks=2)
    with pytest.raises(ValueError, match="task_weights"):
        micro_batch_loss(ce, batch, stats, LossConfig(task_weights={"a": 2.0}), num_tasks=2)
    fts = FocalTaskStats(2)
    fts.all_reduce(None)  # a pre-pass that saw nothing
    with pytest.raises(ValueError, match="pre-pass"):
        micro_batch_loss(ce, batch, stats, LossConfig(mode="focal-task", gamma=1.0), num_tasks=2, focal_task_stats=fts)
    bad = {k: v.clone() for k, v in batch.items()}
    bad["task_ids"][0, 0:3] = torch.tensor([0, 1, 0])
    bad["sample_ids"][0, 0:3] = 0
    with pytest.raises(ValueError, match="more than one task"):
        check_micro_batch(bad, 2)
    bad = {k: v.clone() for k, v in batch.items()}
    bad["sample_ids"][0, -1] = bad["task_ids"][0, -1] = -1  # a padding position ...
    bad["loss_mask"][0, -1] = 1.0  # ... that takes loss
    with pytest.raises(ValueError, match="loss_mask"):
        check_micro_batch(bad, 2)
    with pytest.raises(ValueError, match="task_ids"):
        GlobalBatchStats.gather([batch], 1)


def test_loss_config_validate():
    assert LossConfig().validate() == []
    probs = LossConfig(mode="task-token", gamma=-1.0, alpha={"a": -1.0}, coba_floor=1.0, balancer_interval=0).validate()
    assert all(p.startswith("loss.") for p in probs)
    joined = "\n".join(probs)
    for field in ("loss.gamma", "loss.alpha.a", "loss.coba_floor", "loss.balancer_interval"):
        assert field in joined
