"""Real multi-process checks on gloo: DP = 2 (stats gathered over the group, summed loss and
gradients equal the single-process value) and TP = 2 (megatron's vocab-parallel cross
entropy feeding the loss, gradients of each vocab shard equal the full-vocab reference)."""

from __future__ import annotations

import os
import sys
from typing import get_args

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
import torch.multiprocessing as mp

from megatron_mft.config.loss import LossMode
from megatron_mft.launch.env import join_launcher_store, launcher_store

NT, SEQ, ROWS, V = 5, 24, 8, 16
MODES = list(get_args(LossMode))  # every mode the config accepts




def _cfg(mode, exact=True):
    from megatron_mft.config.loss import LossConfig

    return LossConfig(mode=mode, gamma=1.5 if mode.startswith("focal") else 0.0, focal_task_exact=exact)


def _dp_phase(rank: int, world: int) -> None:
    import torch.distributed as dist

    from megatron_mft.loss import FocalTaskStats, GlobalBatchStats, micro_batch_loss, sum_reports
    from test_loss_reference import make_rows, random_ce, reference_loss, rows_to_batch, split_rows

    rows = make_rows(5, ROWS, SEQ, NT, task_pool=[0, 1, 3, 4])
    layout = split_rows(ROWS, world, 2)[rank]  # this rank's 2 micro batches
    mbs = [rows_to_batch([rows[i] for i in idx], SEQ) for idx in layout]
    stats = GlobalBatchStats.gather(mbs, NT, group=dist.group.WORLD)
    whole = GlobalBatchStats.gather([rows_to_batch(rows, SEQ)], NT)
    assert torch.equal(stats.task_tokens, whole.task_tokens), (stats, whole)
    assert torch.equal(stats.task_samples, whole.task_samples)
    assert int((stats.task_tokens > 0).sum()) == 4  # tasks present
    for mode in MODES:
        ce = random_ce(6, ROWS, SEQ).requires_grad_(True)  # same global tensor on every rank
        cfg = _cfg(mode)
        fts = None
        if mode == "focal-task":
            fts = FocalTaskStats(NT)
            with torch.no_grad():
                for idx, mb in zip(layout, mbs):
                    fts.accumulate(ce[idx], mb)
            fts.all_reduce(dist.group.WORLD)
        total, reports = 0.0, []
        for idx, mb in zip(layout, mbs):
            share, rep = micro_batch_loss(ce[idx], mb, stats, cfg, num_tasks=NT, focal_task_stats=fts)
            total = total + share
            reports.append(rep)
        (grad,) = torch.autograd.grad(total, ce)
        val = total.detach().clone()
        dist.all_reduce(val)
        dist.all_reduce(grad)  # the data-parallel gradient sum, no 1/dp
        rep = sum_reports(reports, group=dist.group.WORLD)
        ref = reference_loss(rows, ce, mode, NT, gamma=cfg.gamma)
        (ref_grad,) = torch.autograd.grad(ref, ce)
        assert torch.allclose(val, ref.detach(), rtol=1e-12), (mode, val, ref)
        assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-15), mode
        assert torch.allclose(rep["objective"], ref.detach(), rtol=1e-12), mode
        assert torch.equal(rep["task_tokens"], stats.task_tokens)


def _tp_phase(rank: int, world: int) -> None:
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_mft.loss import FocalTaskStats, GlobalBatchStats, micro_batch_loss
    from test_loss_reference import make_rows, rows_to_batch

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    assert ps.get_tensor_model_parallel_world_size() == world
    rows = make_rows(8, ROWS, SEQ, NT)
    batch = rows_to_batch(rows, SEQ)
    stats = GlobalBatchStats.gather([batch], NT)  # DP = 1: every TP rank holds the whole batch
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(ROWS, SEQ, V, generator=g)
    labels = torch.randint(0, V, (ROWS, SEQ), generator=g)
    part = V // world
    for mode in MODES:
        cfg = _cfg(mode)

        def loss_of(ce):
            fts = None
            if mode == "focal-task":
                fts = FocalTaskStats(NT)
                fts.accumulate(ce.detach(), batch)
                fts.all_reduce(None)
            return micro_batch_loss(ce, batch, stats, cfg, num_tasks=NT, focal_task_stats=fts)[0]

        shard = logits[..., rank * part : (rank + 1) * part].clone().requires_grad_(True)
        # [s, b, v/tp] as megatron lays it out; the CE works in place on its input: a fresh copy
        ce = vocab_parallel_cross_entropy(shard.transpose(0, 1).contiguous(), labels.t().contiguous()).t()
        val = loss_of(ce)
        (grad,) = torch.autograd.grad(val, shard)
        full = logits.clone().requires_grad_(True)
        ref_ce = F.cross_entropy(full.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(ROWS, SEQ)
        ref = loss_of(ref_ce)
        (ref_grad,) = torch.autograd.grad(ref, full)
        assert torch.allclose(val, ref, rtol=1e-5), (mode, val, ref)
        assert torch.allclose(grad, ref_grad[..., rank * part : (rank + 1) * part], rtol=1e-4, atol=1e-7), mode
    ps.destroy_model_parallel()


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    join_launcher_store(rank, world, port, backend="gloo")
    try:
        _dp_phase(rank, world)
        _tp_phase(rank, world)
    finally:
        dist.destroy_process_group()


def test_gloo_dp2_then_tp2_match_single_process():
    store = launcher_store(2)  # served until the ranks are done
    mp.spawn(_worker, args=(2, store.port), nprocs=2, join=True)
