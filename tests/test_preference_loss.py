"""Preference losses against float64 brute force of the papers' formulas, for every pair mode,
every split of the global batch into micro batches (1/2/4 rows each, and two DP halves).

The reference is written pair by pair with Python loops from the formulas (DPO paper sigmoid,
conservative-DPO label smoothing, IPO with TRL's per-token normalisation, hinge/SLiC, RPO's NLL
on chosen, ORPO's odds ratio on per-token means); the engine's shares are summed over micro
batches. Values and gradients with respect to every token's CE must agree.
"""

import types

import numpy as np
import pytest
import torch

from megatron_mft.data.collate import Row, collate
from megatron_mft.loss.preference import PreferenceStats, preference_loss, preference_metrics, sequence_logps

NT = 3


def _pairs(seed: int, n: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        task = int(rng.integers(0, NT))
        prompt = int(rng.integers(2, 6))
        sides = []
        for _ in range(2):
            ans = int(rng.integers(1, 7))
            toks = rng.integers(5, 50, prompt + ans)
            mask = np.r_[np.zeros(prompt, np.uint8), np.ones(ans, np.uint8)]
            sides.append((toks, mask, task))
        out.append(sides)
    return out


def _rows(pairs, per_row):
    """Packs of whole pairs, chosen then rejected (the layout of data.preference)."""
    return [Row.of([s for p in pairs[i:i + per_row] for s in p]) for i in range(0, len(pairs), per_row)]


def _micro_batches(rows, rows_per_mb):
    width = max(len(r) for r in rows)
    return [collate(rows[i:i + rows_per_mb], width, 0) for i in range(0, len(rows), rows_per_mb)]


def _cfg(mode, stage="dpo", **pref):
    p = dict(beta=0.3, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0, lambda_=0.2) | pref
    return types.SimpleNamespace(mode=mode, preference=types.SimpleNamespace(**p)), stage


def _reference(pairs_ce, ref, tasks, w, mode, stage, pcfg):
    """float64 brute force: pairs_ce[k] = (chosen token CE list, rejected token CE list)."""
    per_task = mode.startswith("task")
    by_token = mode.endswith("token")
    losses, nll_c = [], []
    for k, (cc, rc) in enumerate(pairs_ce):
        pi_c, pi_r = -sum(cc), -sum(rc)
        n_c, n_r = len(cc), len(rc)
        if stage == "orpo":
            a_c, a_r = pi_c / n_c, pi_r / n_r
            log_odds = (a_c - a_r) - (torch.log(1 - torch.exp(a_c)) - torch.log(1 - torch.exp(a_r)))
            losses.append(-pcfg.lambda_ * torch.log(torch.sigmoid(log_odds)))
        else:
            rc_, rr_ = ref[k]
            h = (pi_c - rc_) - (pi_r - rr_)
            b = pcfg.beta
            if pcfg.loss_type == "sigmoid":
                e = pcfg.label_smoothing
                losses.append(-(1 - e) * torch.log(torch.sigmoid(b * h)) - e * torch.log(torch.sigmoid(-b * h)))
            elif pcfg.loss_type == "hinge":
                losses.append(torch.clamp(1 - b * h, min=0))
            else:
                hm = (pi_c - rc_) / n_c - (pi_r - rr_) / n_r
                losses.append((hm - 1 / (2 * b)) ** 2)
        nll_c.append(cc)
    a = 1.0 if stage == "orpo" else pcfg.rpo_alpha
    total = torch.zeros((), dtype=torch.float64)
    if per_task:
        present = [i for i in range(NT) if i in tasks]
        wsum = sum(w[i] for i in present)
        for i in present:
            ks = [k for k in range(len(tasks)) if tasks[k] == i]
            term = sum(losses[k] for k in ks) / len(ks)
            if by_token:
                term = term + a * sum(sum(nll_c[k]) for k in ks) / sum(len(nll_c[k]) for k in ks)
            else:
                term = term + a * sum(sum(nll_c[k]) / len(nll_c[k]) for k in ks) / len(ks)
            total = total + w[i] / wsum * term
    else:
        wp = sum(w[t] for t in tasks)
        total = sum(w[tasks[k]] * losses[k] for k in range(len(tasks))) / wp
        if by_token:
            wt = sum(w[tasks[k]] * len(nll_c[k]) for k in range(len(tasks)))
            total = total + a * sum(w[tasks[k]] * sum(nll_c[k]) for k in range(len(tasks))) / wt
        else:
            total = total + a * sum(w[tasks[k]] * sum(nll_c[k]) / len(nll_c[k]) for k in range(len(tasks))) / wp
    return total


def _run(pairs, per_row, rows_per_mb, cfg, stage, w, seed):
    """Engine: shares summed over micro batches; returns (objective, grads of the pair CEs, report)."""
    rows = _rows(pairs, per_row)
    mbs = _micro_batches(rows, rows_per_mb)
    g = torch.Generator().manual_seed(seed)
    # one CE value per loss position of the whole batch, in micro batch order; the same values
    # whatever the split, because samples keep their order
    n_loss = sum(int((mb["loss_mask"] > 0).sum()) for mb in mbs)
    vals = (torch.rand(n_loss, generator=g, dtype=torch.float64) * 3 + 0.05).requires_grad_()
    ref_vals = torch.randn(2 * len(pairs), generator=g, dtype=torch.float64) * 5 - 30
    stats = PreferenceStats.gather(mbs[: len(mbs) // 2], NT)  # two "DP ranks", summed
    other = PreferenceStats.gather(mbs[len(mbs) // 2:], NT)
    stats = PreferenceStats(stats.pairs + other.pairs, stats.chosen_tokens + other.chosen_tokens)
    total, pos, side = 0.0, 0, 0
    reports = []
    for mb in mbs:
        m = (mb["loss_mask"] > 0).reshape(-1)
        ce = torch.zeros(m.numel(), dtype=torch.float64).masked_scatter(m, vals[pos:pos + int(m.sum())])
        ce = torch.where(m, ce, torch.full_like(ce, float("nan")))  # non-loss positions are never read
        pos += int(m.sum())
        n_samples = int(mb["sample_ids"].max()) + 1
        ref = torch.zeros(m.numel() + 1, dtype=torch.float64)
        ref[:n_samples] = ref_vals[side:side + n_samples]
        side += n_samples
        share, rep = preference_loss(ce.reshape(mb["tokens"].shape), mb, stats, cfg, stage=stage, num_tasks=NT,
                                     task_weights=torch.tensor(w), ref_logps=ref)
        total = total + share
        reports.append(rep)
    (grad,) = torch.autograd.grad(total, vals)
    return total.detach(), grad, vals.detach(), ref_vals, reports, mbs


def _split_per_pair(vals, mbs):
    """Cut the flat CE values back into (chosen, rejected) lists per pair, by sample id."""
    out, pos = [], 0
    for mb in mbs:
        sid = mb["sample_ids"].reshape(-1)[(mb["loss_mask"] > 0).reshape(-1)]
        n = sid.numel()
        chunk = vals[pos:pos + n]
        pos += n
        for k in range(int(sid.max()) // 2 + 1):
            out.append(([chunk[i] for i in range(n) if sid[i] == 2 * k], [chunk[i] for i in range(n) if sid[i] == 2 * k + 1]))
    return out


CASES = [("dpo", dict(loss_type="sigmoid")), ("dpo", dict(loss_type="sigmoid", label_smoothing=0.15)),
         ("dpo", dict(loss_type="ipo")), ("dpo", dict(loss_type="hinge", beta=0.02)),
         ("dpo", dict(loss_type="sigmoid", rpo_alpha=0.7)), ("orpo", {})]


@pytest.mark.parametrize("mode", ["token", "sample", "task-token", "task-sample"])
@pytest.mark.parametrize("stage,pref", CASES)
def test_matches_float64_reference_for_every_split(mode, stage, pref):
    pairs = _pairs(3, 12)
    tasks = [p[0][2] for p in pairs]
    w = [1.0, 2.5, 0.5]
    cfg, stage = _cfg(mode, stage, **pref)
    results = []
    for per_row, rows_per_mb in ((1, 1), (3, 2), (2, 4)):
        obj, grad, vals, ref_vals, _, mbs = _run(pairs, per_row, rows_per_mb, cfg, stage, w, seed=11)
        leaf = vals.clone().requires_grad_()
        per_pair = _split_per_pair(leaf, mbs)
        ref = [(ref_vals[2 * k], ref_vals[2 * k + 1]) for k in range(len(pairs))]
        expect = _reference(per_pair, ref, tasks, w, mode, stage, cfg.preference)
        (g_ref,) = torch.autograd.grad(expect, leaf)
        torch.testing.assert_close(obj, expect.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, g_ref, rtol=1e-10, atol=1e-12)
        results.append(obj)
    assert len({round(float(r), 10) for r in results}) == 1


def test_metrics_are_pair_means_and_sequence_logps_are_masked_sums():
    pairs = _pairs(5, 6)
    cfg, stage = _cfg("sample", "dpo", beta=0.5)
    obj, _, vals, ref_vals, reports, mbs = _run(pairs, 2, 2, cfg, stage, [1.0] * NT, seed=3)
    rep = sum(r["preference"] for r in reports)
    m = preference_metrics(float(obj), rep, ["a", "b", "c"])
    per_pair = _split_per_pair(vals, mbs)
    rc = [0.5 * (-sum(c).item() - ref_vals[2 * k].item()) for k, (c, r) in enumerate(per_pair)]
    rr = [0.5 * (-sum(r).item() - ref_vals[2 * k + 1].item()) for k, (c, r) in enumerate(per_pair)]
    assert m["rewards/chosen"] == pytest.approx(np.mean(rc), rel=1e-12)
    assert m["rewards/rejected"] == pytest.approx(np.mean(rr), rel=1e-12)
    assert m["rewards/accuracy"] == pytest.approx(np.mean([a > b for a, b in zip(rc, rr)]))
    assert m["rewards/margin"] == pytest.approx(np.mean(rc) - np.mean(rr), rel=1e-10)
    assert sum(m[f"task_pairs/{n}"] for n in "abc" if f"task_pairs/{n}" in m) == len(pairs)
    # sequence_logps: per sample slot, minus the CE summed over that sample's loss positions
    mb = mbs[0]
    ce = torch.rand(mb["tokens"].shape, dtype=torch.float64)
    lp = sequence_logps(ce, mb, NT)
    sid, lm = mb["sample_ids"].reshape(-1), mb["loss_mask"].reshape(-1)
    for s in range(int(sid.max()) + 1):
        want = -float((ce.reshape(-1) * ((sid == s) & (lm > 0))).sum())
        assert float(lp[s]) == pytest.approx(want, rel=1e-12)


def test_a_lone_response_is_refused():
    pairs = _pairs(1, 2)
    rows = [Row.of([pairs[0][0], pairs[0][1], pairs[1][0]])]  # the last pair lost its rejected side
    with pytest.raises(ValueError, match="chosen response without its rejected"):
        PreferenceStats.gather([collate(rows, 40, 0)], NT)
    (toks, mask, task), rejected = pairs[0]
    rows = [Row.of([(toks, mask, (task + 1) % NT), rejected])]  # the sides of one pair in two tasks
    with pytest.raises(ValueError, match="two sides of a pair carry different task ids"):
        PreferenceStats.gather([collate(rows, 40, 0)], NT)


def _orpo_pair(ce_chosen, ce_rejected, lam=0.2):
    """ORPO (token mode) on one pair whose answer tokens have the given fp32 CEs: (share, grad of the CEs)."""
    sides = [(np.arange(5, 7 + len(ce)), np.r_[np.zeros(2, np.uint8), np.ones(len(ce), np.uint8)], 0)
             for ce in (ce_chosen, ce_rejected)]
    mb = collate([Row.of(sides)], 20, 0)
    cfg, stage = _cfg("token", "orpo", lambda_=lam)
    vals = torch.tensor(list(ce_chosen) + list(ce_rejected), dtype=torch.float32, requires_grad=True)
    m = (mb["loss_mask"] > 0).reshape(-1)
    ce = torch.zeros(m.numel(), dtype=torch.float32).masked_scatter(m, vals).reshape(mb["tokens"].shape)
    share, _ = preference_loss(ce, mb, PreferenceStats.gather([mb], NT), cfg, stage=stage, num_tasks=NT)
    (grad,) = torch.autograd.grad(share, vals)
    return share.detach(), grad


def _orpo_reference(a_c, a_r, nll, lam=0.2):
    """float64: -lam log sigmoid(log odds_c - log odds_r) + NLL, log odds = a - log(1 - e^a)."""
    a_c, a_r = torch.tensor(a_c, dtype=torch.float64), torch.tensor(a_r, dtype=torch.float64)
    lo = (a_c - a_r) - (torch.log(-torch.expm1(a_c)) - torch.log(-torch.expm1(a_r)))
    return float(-lam * torch.nn.functional.logsigmoid(lo) + nll)


def test_orpo_log_odds_keep_fp32_precision_near_certain_answers():
    """Mean log-probs of -1e-5 and -2e-6: log(1 - e^a) through fp32 exp loses ~3 digits; the
    stable form (TRL's log1mexp) keeps the float64 value."""
    ce_c, ce_r = [1e-5] * 3, [2e-6] * 2
    share, grad = _orpo_pair(ce_c, ce_r)
    want = _orpo_reference(-1e-5, -2e-6, nll=1e-5)
    assert float(share) == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("certain", ["chosen", "rejected", "both"])
def test_orpo_is_finite_when_a_mean_log_prob_rounds_to_zero(certain):
    """An answer whose every token has CE 0 in fp32 (p = 1 to working precision): log(1 - e^0) is
    -inf, so the loss or its gradient was inf/NaN. The mean log-prob is clamped to -eps(fp32)."""
    ce_c = [0.0] * 3 if certain in ("chosen", "both") else [0.7, 1.1, 0.4]
    ce_r = [0.0] * 2 if certain in ("rejected", "both") else [0.9, 1.3]
    share, grad = _orpo_pair(ce_c, ce_r)
    assert torch.isfinite(share) and torch.isfinite(grad).all(), (share, grad)
    eps = torch.finfo(torch.float32).eps
    a_c, a_r = min(-sum(ce_c) / 3, -eps), min(-sum(ce_r) / 2, -eps)
    assert float(share) == pytest.approx(_orpo_reference(a_c, a_r, nll=sum(ce_c) / 3), rel=1e-5)
