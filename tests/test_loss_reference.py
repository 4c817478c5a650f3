"""Brute-force float64 reference of the loss formulas, random packed layouts, and their self-tests.

The reference is written straight from mftcoder-method.md section 5 and docs/losses.md with
explicit loops over tasks, samples and tokens, on the WHOLE global batch (no micro batches),
so it shares nothing with megatron_mft.loss but the micro-batch dict format. Other
tests/test_loss_*.py import the helpers from here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import random

import torch

# ---------------------------------------------------------------- random layouts


def make_rows(seed: int, n_rows: int, seq: int, num_tasks: int, task_pool=None):
    """Packed rows: each row a list of (task, prompt_len, answer_len) samples then padding.

    Tasks drawn from ``task_pool`` (default all); some samples have no answer (no loss
    token), some rows end in padding, some tasks may be absent altogether.
    """
    rng = random.Random(seed)
    pool = list(range(num_tasks)) if task_pool is None else list(task_pool)
    rows = []
    for _ in range(n_rows):
        samples, pos = [], 0
        while pos < seq and not (pos > 0 and rng.random() < 0.15):  # sometimes stop early: padding
            length = min(rng.randint(2, 9), seq - pos)
            answer = 0 if rng.random() < 0.1 else rng.randint(1, max(1, length - 1))
            answer = min(answer, length)
            samples.append((rng.choice(pool), length - answer, answer))
            pos += length
        rows.append(samples)
    return rows


def rows_to_batch(rows, seq: int) -> dict:
    """Micro-batch dict (contract of docs/architecture.md, the loss-relevant keys) from rows."""
    b = len(rows)
    loss_mask = torch.zeros(b, seq, dtype=torch.float32)
    task_ids = torch.full((b, seq), -1, dtype=torch.int64)
    sample_ids = torch.full((b, seq), -1, dtype=torch.int64)
    position_ids = torch.zeros(b, seq, dtype=torch.int64)
    sid = 0
    for r, samples in enumerate(rows):
        pos = 0
        for task, prompt, answer in samples:
            n = prompt + answer
            task_ids[r, pos : pos + n] = task
            sample_ids[r, pos : pos + n] = sid
            position_ids[r, pos : pos + n] = torch.arange(n)
            loss_mask[r, pos + prompt : pos + n] = 1.0
            pos += n
            sid += 1
    return {
        "tokens": torch.zeros(b, seq, dtype=torch.int64),
        "labels": torch.zeros(b, seq, dtype=torch.int64),
        "loss_mask": loss_mask,
        "task_ids": task_ids,
        "sample_ids": sample_ids,
        "position_ids": position_ids,
    }


def split_rows(n_rows: int, dp: int, n_mb: int) -> list[list[list[int]]]:
    """Row indices per DP rank per micro batch (contiguous, equal sizes)."""
    per_mb = n_rows // (dp * n_mb)
    assert per_mb * dp * n_mb == n_rows
    return [[list(range((r * n_mb + k) * per_mb, (r * n_mb + k + 1) * per_mb)) for k in range(n_mb)] for r in range(dp)]


def random_ce(seed: int, n_rows: int, seq: int, dtype=torch.float64, garbage=True) -> torch.Tensor:
    """Positive token CE; with ``garbage`` the caller may overwrite non-loss positions."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_rows, seq, generator=g, dtype=torch.float64) * 4.0 + 0.01).to(dtype)


# ---------------------------------------------------------------- reference


def samples_of(rows, ce: torch.Tensor):
    """[(task, [ce scalars of the sample's loss tokens])] over the whole global batch."""
    out = []
    for r, samples in enumerate(rows):
        pos = 0
        for task, prompt, answer in samples:
            toks = [ce[r, pos + prompt + k] for k in range(answer)]
            if toks:
                out.append((task, toks))
            pos += prompt + answer
    return out


def reference_loss(rows, ce, mode: str, num_tasks: int, weights=None, alpha=None, gamma: float = 0.0):
    """The formula of ``mode`` over the whole global batch, float64, explicit loops.

    weights (per task, default 1): token/sample modes weight each token/sample and divide by
    the sum of those weights; task modes weight each task's term and divide by the sum of the
    weights of the tasks present. alpha (per task, default 1) for the focal modes.
    """
    w = [1.0] * num_tasks if weights is None else [float(x) for x in weights]
    a = [1.0] * num_tasks if alpha is None else [float(x) for x in alpha]
    samples = samples_of(rows, ce.to(torch.float64))
    zero = ce.sum() * 0.0
    if mode == "token":
        num, den = zero, 0.0
        for task, toks in samples:
            for t in toks:
                num = num + w[task] * t
                den += w[task]
        return num / den if den > 0 else zero
    if mode in ("sample", "focal-sample"):
        num, den = zero, 0.0
        for task, toks in samples:
            if mode == "sample":
                term = sum(toks) / len(toks)
            else:
                P = sum(torch.exp(-t) for t in toks) / len(toks)
                Q = sum(-t for t in toks) / len(toks)
                term = -a[task] * (1 - P) ** gamma * Q
            num = num + w[task] * term
            den += w[task]
        return num / den if den > 0 else zero
    # task-level modes
    num, den = zero, 0.0
    for i in range(num_tasks):
        mine = [toks for task, toks in samples if task == i]
        if not mine:
            continue  # task absent from the global batch: not counted in N
        if mode == "task-token":
            s, n = zero, 0
            for toks in mine:
                for t in toks:
                    s = s + t
                    n += 1
            term = s / n
        elif mode == "task-sample":
            term = sum(sum(toks) / len(toks) for toks in mine) / len(mine)
        elif mode == "focal-task":
            P = sum(sum(torch.exp(-t) for t in toks) / len(toks) for toks in mine) / len(mine)
            Q = sum(sum(-t for t in toks) / len(toks) for toks in mine) / len(mine)
            term = -a[i] * (1 - P) ** gamma * Q
        else:
            raise ValueError(mode)
        num = num + w[i] * term
        den += w[i]
    return num / den if den > 0 else zero


# ---------------------------------------------------------------- self-tests of the reference


def test_reference_token_is_plain_masked_mean():
    seq, n_rows = 20, 4
    rows = make_rows(1, n_rows, seq, 3)
    batch = rows_to_batch(rows, seq)
    ce = random_ce(2, n_rows, seq)
    m = batch["loss_mask"].double()
    expected = (ce * m).sum() / m.sum()
    assert torch.allclose(reference_loss(rows, ce, "token", 3), expected, rtol=1e-12)


def test_layouts_cover_the_cases_the_tests_rely_on():
    seq, n_rows = 24, 8
    rows = make_rows(7, n_rows, seq, 5, task_pool=[0, 1, 3])
    batch = rows_to_batch(rows, seq)
    per_row = [len(r) for r in rows]
    assert max(per_row) >= 3  # several samples per packed row
    assert (batch["sample_ids"] == -1).any()  # padding
    assert any(ans == 0 for r in rows for _, _, ans in r)  # a sample without loss tokens
    assert set(batch["task_ids"][batch["task_ids"] >= 0].tolist()) <= {0, 1, 3}  # absent tasks
