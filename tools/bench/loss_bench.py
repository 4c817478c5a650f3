#!/usr/bin/env python
"""Time each loss mode against plain cross entropy on the same logits (CPU by default).

What one timed iteration is, for every variant: megatron-core's vocab-parallel cross entropy
(TP = 1, a 1-process gloo group) forward on [s, b, V] fp32 logits, the reduction to a scalar,
and the backward to the logits. "plain" reduces with the masked token mean; the modes reduce
with ``micro_batch_loss`` (GlobalBatchStats of the batch gathered once, outside the timer, as
the trainer does once per step; its cost is printed separately). Variants run round-robin,
the figure is the median of the repeats; ratios are mode / plain.

    python tools/bench/loss_bench.py                      # 8 x 4096 tokens, vocab 32000, 5 tasks
    python tools/bench/loss_bench.py --seq 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402


from megatron_mft.config.base import int_range  # noqa: E402
from megatron_mft.errors import UsageError, command  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_batch(b: int, s: int, num_tasks: int, seed: int = 0) -> dict:
    """Packed rows of samples 64..1024 tokens (about half prompt), random tasks, padding tails."""
    rng = random.Random(seed)
    loss_mask = torch.zeros(b, s)
    task_ids = torch.full((b, s), -1, dtype=torch.int64)
    sample_ids = torch.full((b, s), -1, dtype=torch.int64)
    sid = 0
    for r in range(b):
        pos = 0
        while pos < s - 64:
            n = min(rng.randint(64, 1024), s - pos)
            prompt = rng.randint(n // 4, 3 * n // 4)
            task_ids[r, pos : pos + n] = rng.randrange(num_tasks)
            sample_ids[r, pos : pos + n] = sid
            loss_mask[r, pos + prompt : pos + n] = 1.0
            pos, sid = pos + n, sid + 1
    return {"loss_mask": loss_mask, "task_ids": task_ids, "sample_ids": sample_ids}


def init_megatron_tp1():
    from megatron.core import parallel_state as ps

    from megatron_mft.launch import init_distributed

    init_distributed(backend="gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int_range(1), default=8)
    ap.add_argument("--seq", type=int_range(1), default=4096)
    ap.add_argument("--vocab", type=int_range(1), default=32000)
    ap.add_argument("--tasks", type=int_range(1), default=5)
    ap.add_argument("--repeats", type=int_range(1), default=4)
    ap.add_argument("--ce", choices=["megatron", "torch"], default="megatron",
                    help="megatron: vocab_parallel_cross_entropy at TP=1; torch: F.cross_entropy(reduction='none')")
    args = ap.parse_args()
    if args.seq <= 64:  # make_batch starts a sample only where more than 64 tokens are left
        raise UsageError(f"loss_bench.py: --seq {args.seq}: a row holds synthetic samples of 64 to 1024 tokens, "
                         f"so --seq must be at least 65 (else no token takes loss and the timings are of nothing)")

    from megatron_mft.config.loss import LossConfig
    from megatron_mft.loss import (
        CoBaBalancer,
        FAMOBalancer,
        FocalTaskStats,
        GlobalBatchStats,
        micro_batch_loss,
    )

    b, s, V, nt = args.batch, args.seq, args.vocab, args.tasks
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), torch {torch.__version__}, "
          f"device cpu, load avg {os.getloadavg()[0]:.2f}")
    ce_name = "megatron.core.tensor_parallel.vocab_parallel_cross_entropy (TP=1, gloo)"
    if args.ce == "megatron":
        try:
            init_megatron_tp1()
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        except Exception as e:  # CUDA-only call on this machine: fall back, and say so
            print(f"megatron vocab-parallel CE unavailable on CPU ({type(e).__name__}: {e}); using torch")
            args.ce = "torch"
    if args.ce == "torch":
        ce_name = "torch.nn.functional.cross_entropy(reduction='none') (NOT megatron's)"

        def token_ce(logits_sbv, target_sb):
            return torch.nn.functional.cross_entropy(
                logits_sbv.reshape(-1, V), target_sb.reshape(-1), reduction="none").view(target_sb.shape)
    else:
        def token_ce(logits_sbv, target_sb):
            return vocab_parallel_cross_entropy(logits_sbv, target_sb)

    print(f"shape: {b} x {s} tokens, vocab {V}, {nt} tasks, fp32 logits {b * s * V * 4 / 2**30:.1f} GiB; CE: {ce_name}")

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(s, b, V, generator=g)  # megatron layout [s, b, V]
    target = torch.randint(0, V, (s, b), generator=g)
    batch = make_batch(b, s, nt)
    mask = batch["loss_mask"]
    n_samples = int(batch["sample_ids"].max()) + 1
    print(f"batch: {n_samples} packed samples, {int(mask.sum())} loss tokens of {b * s}")
    work = torch.empty_like(logits)

    t0 = time.perf_counter()
    stats = GlobalBatchStats.gather([batch], nt)
    t_gather = time.perf_counter() - t0

    def reduce_plain(ce_bs):
        return (ce_bs * mask).sum() / mask.sum()

    def reducer(mode, exact=True):
        cfg = LossConfig(mode=mode, gamma=2.0 if mode.startswith("focal") else 0.0, focal_task_exact=exact)

        def fn(ce_bs):
            fts = None
            if mode == "focal-task" and exact:
                fts = FocalTaskStats(nt)
                fts.accumulate(ce_bs.detach(), batch)  # the pre-pass's loss-side work (its CE is extra)
                fts.all_reduce(None)
            return micro_batch_loss(ce_bs, batch, stats, cfg, num_tasks=nt, focal_task_stats=fts)[0]
        return fn

    variants = {"plain CE (token mean)": reduce_plain}
    for mode in ["token", "sample", "task-token", "task-sample", "focal-sample"]:
        variants[mode] = reducer(mode)
    variants["focal-task exact*"] = reducer("focal-task", True)
    variants["focal-task one-pass"] = reducer("focal-task", False)

    def run_once(fn) -> float:
        with torch.no_grad():
            work.copy_(logits)
        if fn is None:  # no-grad CE forward: the focal-task pre-pass / a validation forward
            with torch.no_grad():
                t = time.perf_counter()
                f = FocalTaskStats(nt)
                f.accumulate(token_ce(work, target).t(), batch)
                f.all_reduce(None)
                return time.perf_counter() - t
        x = work.requires_grad_(True)
        t = time.perf_counter()
        ce_bs = token_ce(x, target).t()  # [b, s] as megatron's GPTModel hands it to loss_func
        loss = fn(ce_bs)
        # autograd.grad, not backward(): accumulating into a leaf's .grad would copy the
        # 4 GiB gradient every iteration (page faults that swamp the differences measured)
        (grad,) = torch.autograd.grad(loss, x)
        dt = time.perf_counter() - t
        del grad
        x.requires_grad_(False)
        return dt

    PRE = "no-grad CE fwd (pre-pass)"
    timed = dict(variants)
    timed[PRE] = None
    times: dict[str, list[float]] = {k: [] for k in timed}
    order = list(timed)
    shuffle = random.Random(1)
    for rep in range(args.repeats + 1):  # round 0 is warm-up; each round in a fresh random order
        shuffle.shuffle(order)
        for name in order:
            dt = run_once(timed[name])
            if rep:
                times[name].append(dt)

    # loss-side cost alone (given token CE that needs grad): forward + backward of the reduction
    ce_leaf = (torch.rand(b, s, generator=g) * 5).requires_grad_(True)
    loss_only = {}
    for name, fn in variants.items():
        ts = []
        for _ in range(11):
            t = time.perf_counter()
            fn(ce_leaf).backward()
            ts.append(time.perf_counter() - t)
            ce_leaf.grad = None
        loss_only[name] = statistics.median(ts[1:])

    PLAIN = "plain CE (token mean)"
    base, base_min = statistics.median(times[PLAIN]), min(times[PLAIN])
    load = os.getloadavg()[0]
    print(f"\nload avg now {load:.2f} on {os.cpu_count()} CPUs{' (contended: end-to-end columns are noisy)' if load > (os.cpu_count() or 1) else ''}")
    print(f"{'variant':<26}{'CE fwd+loss+bwd: median s':>26}{'ratio':>7}{'min s':>8}{'ratio':>7}"
          f"{'loss-only ms':>14}{'est. ratio':>12}")
    for name in timed:
        med, mn = statistics.median(times[name]), min(times[name])
        lo = loss_only.get(name)
        # est. ratio: the plain run plus this mode's extra loss-side time (robust to load noise)
        est = f"{(base_min + lo - loss_only[PLAIN]) / base_min:>12.4f}" if lo is not None else f"{'':>12}"
        los = f"{lo * 1e3:>14.2f}" if lo is not None else f"{'':>14}"
        print(f"{name:<26}{med:>26.3f}{med / base:>7.3f}{mn:>8.3f}{mn / base_min:>7.3f}{los}{est}")
    worst = max((base_min + loss_only[k] - loss_only[PLAIN]) / base_min for k in variants if k != PLAIN)
    worst_e2e = max(min(times[k]) / base_min for k in variants if k != PLAIN)
    print(f"target: every mode within 10% of plain CE -> worst est. ratio {worst:.4f} "
          f"({'met' if worst <= 1.10 else 'NOT met'}); worst end-to-end min ratio {worst_e2e:.3f}")
    print(f"\nGlobalBatchStats.gather (once per step, CPU, from the data): {t_gather * 1e3:.2f} ms")
    t_pre = min(times[PRE])
    print(f"* focal-task exact also needs the no-grad pre-pass (row '{PRE}'): min {t_pre:.3f} s = "
          f"{t_pre / base_min:.2f} x plain here, where the CE is the whole 'model'; in training it is one extra "
          f"forward of the model per step (~1/3 of a step)")

    # balancers: their own cost per update; the real cost is the validation passes feeding them
    val = {i: 1.0 + 0.1 * i for i in range(nt)}
    for cls in (CoBaBalancer, FAMOBalancer):
        bal = cls(nt)
        for k in range(30):
            bal.update(10 * k, {i: v * (0.99**k) for i, v in val.items()})
        t = time.perf_counter()
        n = 200
        for k in range(30, 30 + n):
            bal.update(10 * k, {i: v * (0.99**k) for i, v in val.items()})
        print(f"{cls.__name__}.update: {(time.perf_counter() - t) / n * 1e6:.0f} us per update (none: 0)")
    print(f"validation forward of one micro batch with this CE as the 'model' (row '{PRE}'): "
          f"{t_pre / base_min:.2f} x a training micro batch (fwd+bwd), by the min times")
    print("balancer overhead per step = (validation micro batches per update x t_val_fwd) / "
          "(balancer_interval x micro batches per step x t_train_microbatch)")


if __name__ == "__main__":
    from megatron_mft.training.parallel import teardown

    try:
        code = command(lambda argv: main() or 0)()
    finally:  # gloo aborts at interpreter exit if its group is left up
        teardown()
    sys.exit(code)
