"""Preference losses (DPO sigmoid / IPO / hinge, RPO's NLL term, ORPO) over packed pairs.

Pair layout (megatron_mft.data.preference): every pair is two adjacent samples of one row,
chosen then rejected, so in a micro batch sample id ``2k`` is the chosen and ``2k+1`` the
rejected response of pair ``k`` and both sides of a pair are local to the micro batch (as a
sample's tokens are for the SFT modes). A sequence log-prob is the sum of per-token log-probs
over the sample's loss mask (the last assistant turn).

Exactness over the global batch (docs/architecture.md, loss contract): every normaliser (pairs
per task, chosen loss tokens per task) is counted from the data before the forward
(``PreferenceStats.gather``), and the objective is a sum of per-pair and per-token terms
divided by those constants, so the shares of the micro batches and DP ranks add up to the
formula over the whole global batch, in value and gradient. Formulas: docs/preference.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_mft.loss.layout import Layout, build_layout, per_task_sum
from megatron_mft.loss.stats import _all_reduce_sum, check_micro_batch

#: loss.mode -> (pairs averaged per task?, NLL term normalised by chosen tokens?)
PAIR_MODES = {"token": (False, True), "sample": (False, False),
              "task-token": (True, True), "task-sample": (True, False)}
#: report rows (float64 [rows, num_tasks]) summed over micro batches and DP ranks
REPORT_ROWS = ("pairs", "pair_loss", "rewards_chosen", "rewards_rejected", "accuracy", "logps_chosen",
               "logps_rejected", "chosen_ce_sum", "chosen_tokens")


def _inv(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-300), torch.zeros_like(x))


def _pad(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, v.new_zeros(1)])


@dataclass
class PairView:
    """The pair layout of one micro batch: pair k = samples (2k, 2k+1). Built once per micro batch
    and pass by ``pair_view`` (the stats' check and counts, the reference's and the loss's sequence
    log-probs all read it)."""

    lay: Layout
    chosen_slots: torch.Tensor  # int64 [np]
    rejected_slots: torch.Tensor  # int64 [np]
    live: torch.Tensor  # bool [np]: both sides have loss tokens
    task: torch.Tensor  # int64 [np]: task (dummy task num_tasks when not live)
    chosen_tok: torch.Tensor  # bool [b*s]: loss position of a chosen response

    def slot_logps(self, token_ce: torch.Tensor) -> torch.Tensor:
        """Per sample slot, the sum of log p over its loss tokens ([b*s + 1]; the dummy slot last)."""
        lay = self.lay
        ce = token_ce.reshape(-1).to(lay.slot_tokens.dtype)
        ce = torch.where(lay.mask, ce, torch.zeros_like(ce))
        return torch.zeros(lay.n_slots, dtype=ce.dtype, device=ce.device).index_add(0, lay.slot, -ce)

    def check(self, where: str) -> None:
        """Every sample with loss tokens has its partner (2k <-> 2k+1) with loss tokens, same task
        (host tensors: it reads values)."""
        lay = self.lay
        n = lay.slot.numel()
        lone_last = n % 2 == 1 and bool(lay.slot_live[n - 1])  # sample n-1 has no partner slot
        if lone_last or not torch.equal(lay.slot_live[self.chosen_slots], lay.slot_live[self.rejected_slots]):
            raise ValueError(f"{where}: a chosen response without its rejected one (or the reverse): preference "
                             f"data must hold pairs as adjacent samples (preprocess with --mode preference)")
        if not torch.equal(lay.slot_task[self.chosen_slots], lay.slot_task[self.rejected_slots]):
            raise ValueError(f"{where}: the two sides of a pair carry different task ids")


def pair_view(batch: dict, num_tasks: int, device, dtype) -> PairView:
    lay = build_layout(batch, num_tasks, device, dtype)
    n = lay.slot.numel()
    n_pairs = n // 2
    c = torch.arange(0, 2 * n_pairs, 2, device=device)
    r = c + 1
    live = lay.slot_live[c] & lay.slot_live[r]
    task = torch.where(live, lay.slot_task[c], num_tasks)
    chosen_tok = lay.mask & (lay.slot % 2 == 0)
    return PairView(lay, c, r, live, task, chosen_tok)


@dataclass
class PreferenceStats:
    """Pairs and chosen loss tokens per task over the global batch (all micro batches, DP ranks)."""

    pairs: torch.Tensor  # float64 [nt]
    chosen_tokens: torch.Tensor  # float64 [nt]

    @classmethod
    def gather(cls, micro_batches: list[dict], num_tasks: int, group=None, check: bool = True) -> "PreferenceStats":
        counts = torch.zeros(2, num_tasks, dtype=torch.float64)
        for k, mb in enumerate(micro_batches):
            if check:
                check_micro_batch(mb, num_tasks, where=f"micro batch {k}")
            v = pair_view(mb, num_tasks, torch.device("cpu"), torch.float64)
            if check:
                v.check(where=f"micro batch {k}")
            counts[0] += per_task_sum(v.live.double(), v.task, num_tasks)[:num_tasks]
            counts[1] += per_task_sum(v.chosen_tok.double(), v.lay.tok_task, num_tasks)[:num_tasks]
        counts = _all_reduce_sum(counts, group)
        return cls(pairs=counts[0].clone(), chosen_tokens=counts[1].clone())


def sequence_logps(token_ce: torch.Tensor, batch: dict, num_tasks: int) -> torch.Tensor:
    """Per sample slot: sum of log p over the sample's loss tokens ([b*s + 1], float64 no-grad use
    for reference passes; the dummy slot last)."""
    dtype = torch.promote_types(token_ce.dtype, torch.float32)
    return pair_view(batch, num_tasks, token_ce.device, dtype).slot_logps(token_ce)


def log1m_exp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a mean log-prob a < 0, as TRL's ORPO (log(-expm1 a) above -ln 2, log1p(-e^a)
    below: fp32 exp near 0 loses digits), with a clamped to -eps of its dtype: an answer whose
    log-prob rounds to 0 (p = 1 to working precision) would give -inf and NaN gradients. Each
    branch gets an input where it is finite, so the branch torch.where drops has no inf * 0."""
    a = a.clamp(max=-torch.finfo(a.dtype).eps)
    near = a > -math.log(2)
    far_a = torch.where(near, torch.full_like(a, -math.log(2)), a)
    near_a = torch.where(near, a, torch.full_like(a, -math.log(2)))
    return torch.where(near, torch.log(-torch.expm1(near_a)), torch.log1p(-torch.exp(far_a)))


def pair_losses(stage: str, pcfg, pi_c, pi_r, n_c, n_r, ref_c=None, ref_r=None):
    """(per-pair loss, reward chosen, reward rejected) from sequence log-probs (sums over tokens)
    and response token counts. dpo: rewards beta (log pi - log pi_ref); ipo uses per-token means
    (as TRL); orpo: odds-ratio term -lambda log sigmoid(log odds ratio) on per-token means,
    rewards lambda * mean log p (as TRL)."""
    if stage == "orpo":
        lam = pcfg.lambda_
        a_c, a_r = pi_c / n_c.clamp_min(1), pi_r / n_r.clamp_min(1)
        log_odds = (a_c - a_r) - (log1m_exp(a_c) - log1m_exp(a_r))  # log(p/(1-p)), per-token mean p
        loss = -lam * F.logsigmoid(log_odds)
        return loss, (lam * a_c).detach(), (lam * a_r).detach()
    beta = pcfg.beta
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if pcfg.loss_type == "ipo":  # per-token means of the log-ratios (TRL's IPO; rewards stay sums)
        h = (pi_c - ref_c) / n_c.clamp_min(1) - (pi_r - ref_r) / n_r.clamp_min(1)
    if pcfg.loss_type == "sigmoid":
        ls = pcfg.label_smoothing
        loss = -(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)
    elif pcfg.loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif pcfg.loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss.preference.loss_type: {pcfg.loss_type!r} is not sigmoid, ipo or hinge")
    return loss, (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach()


def preference_loss(
    token_ce: torch.Tensor,
    batch: dict,
    stats: PreferenceStats,
    loss_cfg,
    *,
    stage: str,
    num_tasks: int,
    task_weights: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro batch's share of the step's preference objective, and a report to sum.

    token_ce: [b, s] per-token CE; ref_logps: [b*s + 1] reference sequence log-probs per sample
    slot (``sequence_logps`` of the reference forward; dpo only). Objective (w_i task weights,
    P_i pairs, C_i chosen loss tokens, a = rpo_alpha for dpo, 1 for orpo, l_p the pair loss):

      token/sample:       sum_p w_i l_p / sum_i w_i P_i + a * NLL
      task-token/-sample: sum_i c_i [ (1/P_i) sum_{p in i} l_p + a * NLL_i ],  c_i = w_i / sum_present w_i

    NLL over chosen tokens: token modes divide by (weighted) chosen tokens, sample modes average
    each pair's per-token mean over pairs.
    """
    if loss_cfg.mode not in PAIR_MODES:
        raise ValueError(f"loss.mode {loss_cfg.mode!r}: the preference stages take {', '.join(PAIR_MODES)}")
    if stage not in ("dpo", "orpo"):
        raise ValueError(f"stage {stage!r}: expected dpo or orpo")
    if stage == "dpo" and ref_logps is None:
        raise ValueError("dpo needs the reference log-probs of the micro batch (ref_logps)")
    per_task, nll_by_token = PAIR_MODES[loss_cfg.mode]
    pcfg = loss_cfg.preference
    dev = token_ce.device
    dtype = torch.promote_types(token_ce.dtype, torch.float32)
    v = pair_view(batch, num_tasks, dev, dtype)
    lay = v.lay
    ce = token_ce.reshape(-1).to(dtype)
    ce = torch.where(lay.mask, ce, torch.zeros_like(ce))
    slot_lp = v.slot_logps(ce)
    pi_c, pi_r = slot_lp[v.chosen_slots], slot_lp[v.rejected_slots]
    n_c, n_r = lay.slot_tokens[v.chosen_slots], lay.slot_tokens[v.rejected_slots]
    ref_c = ref_r = None
    if stage == "dpo":
        ref = ref_logps.to(dev, dtype)
        ref_c, ref_r = ref[v.chosen_slots], ref[v.rejected_slots]
    loss_p, rew_c, rew_r = pair_losses(stage, pcfg, pi_c, pi_r, n_c, n_r, ref_c, ref_r)
    loss_p = torch.where(v.live, loss_p, torch.zeros_like(loss_p))

    f64 = dict(device=dev, dtype=torch.float64)
    w = torch.ones(num_tasks, **f64) if task_weights is None else task_weights.to(**f64).reshape(num_tasks)
    P, C = stats.pairs.to(dev), stats.chosen_tokens.to(dev)
    if per_task:
        present = (P > 0).to(torch.float64)
        c = w * present * _inv((w * present).sum())
        pair_coef, tok_coef, samp_coef = c * _inv(P), c * _inv(C), c * _inv(P)
    else:
        pair_coef = w * _inv((w * P).sum())
        tok_coef, samp_coef = w * _inv((w * C).sum()), pair_coef
    share = torch.dot(loss_p, _pad(pair_coef).to(dtype)[v.task])
    nll_weight = 1.0 if stage == "orpo" else pcfg.rpo_alpha
    if nll_weight:
        if nll_by_token:
            coef = _pad(tok_coef).to(dtype)[lay.tok_task]
        else:  # per-pair mean of the chosen response's token mean
            coef = _pad(samp_coef).to(dtype)[lay.tok_task] / lay.slot_tokens.clamp_min(1)[lay.slot]
        coef = torch.where(v.chosen_tok, coef, torch.zeros_like(coef))
        share = share + nll_weight * torch.dot(ce, coef)

    with torch.no_grad():
        live = v.live.to(torch.float64)

        def by_task(x):
            return per_task_sum(x.detach().to(torch.float64) * live, v.task, num_tasks)[:num_tasks]

        report = torch.stack([
            by_task(torch.ones_like(live)), by_task(loss_p), by_task(rew_c), by_task(rew_r),
            by_task((rew_c > rew_r).to(torch.float64)), by_task(pi_c), by_task(pi_r),
            per_task_sum(torch.where(v.chosen_tok, ce, torch.zeros_like(ce)).detach().double(), lay.tok_task,
                         num_tasks)[:num_tasks],
            per_task_sum(v.chosen_tok.double(), lay.tok_task, num_tasks)[:num_tasks],
        ])
    return share, {"objective": share.detach().to(torch.float64), "preference": report}


def preference_metrics(objective: float, report: torch.Tensor, task_names, task_weights=None) -> dict:
    """metrics.jsonl fields of one step from the summed report [len(REPORT_ROWS), nt]."""
    r = dict(zip(REPORT_ROWS, report.double().cpu()))
    out = {"loss": float(objective)}
    pairs = float(r["pairs"].sum())

    def mean(row):
        return float(r[row].sum()) / pairs if pairs else None

    for key, row in (("pref_loss", "pair_loss"), ("rewards/chosen", "rewards_chosen"),
                     ("rewards/rejected", "rewards_rejected"), ("rewards/accuracy", "accuracy"),
                     ("logps/chosen", "logps_chosen"), ("logps/rejected", "logps_rejected")):
        out[key] = mean(row)
    out["rewards/margin"] = None if not pairs else out["rewards/chosen"] - out["rewards/rejected"]
    tok = float(r["chosen_tokens"].sum())
    out["nll_chosen"] = float(r["chosen_ce_sum"].sum()) / tok if tok else None
    for i, name in enumerate(task_names):
        n = float(r["pairs"][i])
        if not n:
            continue
        m = {k: float(r[k][i]) / n for k in ("pair_loss", "rewards_chosen", "rewards_rejected", "accuracy",
                                             "logps_chosen", "logps_rejected")}
        out[f"task_pairs/{name}"] = n
        out[f"task_pref_loss/{name}"] = m["pair_loss"]
        out[f"task_rewards_chosen/{name}"] = m["rewards_chosen"]
        out[f"task_rewards_rejected/{name}"] = m["rewards_rejected"]
        out[f"task_rewards_margin/{name}"] = m["rewards_chosen"] - m["rewards_rejected"]
        out[f"task_rewards_accuracy/{name}"] = m["accuracy"]
        out[f"task_logps_chosen/{name}"] = m["logps_chosen"]
        out[f"task_logps_rejected/{name}"] = m["logps_rejected"]
        t = float(r["chosen_tokens"][i])
        out[f"task_loss/{name}"] = float(r["chosen_ce_sum"][i]) / t if t else None  # chosen CE: comparable to SFT
        out[f"task_tokens/{name}"] = t
        if task_weights is not None:
            out[f"task_weight/{name}"] = float(task_weights[i])
    return out
