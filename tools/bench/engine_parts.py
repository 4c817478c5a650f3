"""Where the engine's CPU time goes against a plain transformers loop, part by part: paired,
alternating A/B timings (process CPU time, the steadier clock on a shared machine) of each piece
issue 14 names, on the tiny preset's shapes (seq 512, micro batch 2, 2 micro batches).

    python tools/bench/engine_parts.py [--reps 20]

Parts: RoPE (megatron's unfused THD path vs the per-micro-batch cos/sin tables of
megatron_mft/model/rope.py), AdamW (torch's per-parameter loop vs its fused kernel), weight
gradients (allocated and added into main_grad by DDP's hook vs accumulated in the GEMM),
SwiGLU (megatron's chunk of the fused fc1 output vs two separate projections as in transformers),
cross entropy (megatron's vocab-parallel CE vs torch's), the GEMM time of a whole step
(profiled, wall clock per operator), and the fixed per-step cost of the
frameworks (2 micro batches of 16 tokens, where compute is negligible; transformers' loop runs
without the CPU shim's function mode, as in its own --compare-hf worker). Then the third
round's fixed-cost changes, each switched off and on in one engine: the shim's function mode
popped where no CUDA literal is, megatron's TP = 1 region nodes skipped, foreach grad norm and
clipping, global-batch statistics in one pass. And the GEMM calls of the linears (fourth round):
megatron's 3-D forward ``matmul`` against ``F.linear`` (adopted), Apex's weight-gradient
formula against the transposed product (not adopted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


from megatron_mft.config.base import int_range  # noqa: E402
from megatron_mft.errors import command  # noqa: E402


def paired(a, b, reps: int) -> tuple[float, float, float, float, float]:
    """Median CPU ms of a and b (alternating order) and the median, min, max of a/b."""
    a(), b()
    ta, tb = [], []
    for r in range(reps):
        for fn, acc in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            c0 = time.process_time()
            fn()
            acc.append(time.process_time() - c0)
    ratios = [x / y for x, y in zip(ta, tb)]
    return (statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, statistics.median(ratios), min(ratios),
            max(ratios))


def show(name: str, a: str, b: str, res) -> None:
    ma, mb, r, lo, hi = res
    print(f"{name:34s} {a} {ma:7.2f} ms | {b} {mb:7.2f} ms | ratio {r:.2f} ({lo:.2f}-{hi:.2f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int_range(1), default=20)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import train_throughput as tt
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_mft.model.rope import rope_thd

    print(f"machine: {platform.node()} | {os.cpu_count()} CPUs | load avg "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} | torch {torch.__version__} | 1 thread | CPU ms, "
          f"median of {args.reps} alternating pairs; ratio = first / second", flush=True)
    bargs = tt._args([])
    eng = tt.Engine(bargs)  # tiny preset, parallel state, DDP, optimizer
    g = torch.Generator().manual_seed(0)

    # RoPE: q [1024, 4, 32] and k [1024, 2, 32], two documents of 512, forward + backward
    freqs = RotaryEmbedding(32, 1.0, rotary_base=1000000)(512)
    cu = torch.tensor([0, 512, 1024], dtype=torch.int32)
    q0, k0 = torch.randn(1024, 4, 32, generator=g), torch.randn(1024, 2, 32, generator=g)
    cp = ps.get_context_parallel_group()

    def rope(fn):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        (fn(q).sum() + fn(k).sum()).backward()

    show("RoPE, one layer (q and k)", "megatron unfused", "ours", paired(
        partial(rope, lambda t: _apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=cp)),
        partial(rope, lambda t: rope_thd(t, cu, freqs)), args.reps))

    # AdamW on the tiny preset's parameter shapes
    shapes = [tuple(p.shape) for c in eng.raw for p in c.parameters()]

    def adam(**kw):
        ps_ = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        for p in ps_:
            p.grad = torch.randn(p.shape, generator=g)
        return torch.optim.AdamW(ps_, lr=1e-4, **kw).step

    show("AdamW step (all parameters)", "per-parameter loop", "fused", paired(adam(foreach=False), adam(fused=True),
                                                                              args.reps))

    # weight gradients into main_grad: fused (GEMM accumulates) vs DDP's hook add
    from megatron.core.tensor_parallel import layers

    from megatron_mft.loss import GlobalBatchStats
    from megatron_mft.training.step import _loss_func, run_schedule

    mods = [m for c in eng.chunks for m in c.modules() if isinstance(m, (layers.ColumnParallelLinear,
                                                                             layers.RowParallelLinear))
            and m.gradient_accumulation_fusion]
    tokens = tt.token_batches(bargs, 2048)
    batches = [tt.micro_batch(t, 1, g) for t in tokens]
    stats = GlobalBatchStats.gather(batches, 1, group=ps.get_data_parallel_group())

    def fwd_bwd(fused: bool):
        for m in mods:
            m.gradient_accumulation_fusion = fused
        for c in eng.chunks:
            c.zero_grad_buffer()
        run_schedule(eng.chunks, batches, eng.ctx, partial(_loss_func, eng.ctx, stats, None), forward_only=False)

    show("forward+backward, 2 micro batches", "wgrad into main_grad", "grad + hook add",
         paired(partial(fwd_bwd, True), partial(fwd_bwd, False), args.reps))
    fwd_bwd(True)

    # SwiGLU as megatron computes it on the fused fc1 output vs transformers' two projections
    x0, a0, b0 = (torch.randn(1024, 1, n, generator=g) for n in (704, 352, 352))
    gy = torch.randn(1024, 1, 352, generator=g)

    def glu_megatron():
        x = x0.clone().requires_grad_()
        x1, x2 = torch.chunk(x, 2, dim=-1)
        (F.silu(x1) * (x2 + 0.0)).backward(gy)

    def glu_hf():
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        (F.silu(a) * b).backward(gy)

    show("SwiGLU, one layer", "megatron (chunk)", "transformers", paired(glu_megatron, glu_hf, args.reps))

    # cross entropy over [512, 2, 2048] logits
    logits0 = torch.randn(512, 2, 2048, generator=g)
    labels = torch.randint(0, 2048, (512, 2), generator=g)

    def ce_megatron():
        lg = logits0.clone().requires_grad_()
        tensor_parallel.vocab_parallel_cross_entropy(lg, labels).sum().backward()

    def ce_torch():
        lg = logits0.clone().requires_grad_()
        F.cross_entropy(lg.view(-1, 2048), labels.view(-1), reduction="none").sum().backward()

    show("cross entropy, one micro batch", "megatron vocab-parallel", "torch", paired(ce_megatron, ce_torch, args.reps))

    # the GEMM calls of the tiny preset's linears (x4 layers + the output layer), one micro batch:
    # megatron's 3-D forward matmul vs F.linear (model/linear.py), Apex's wgrad formula vs the
    # transposed product into the transposed view (tried; no gain in turn, not adopted); same bits each
    linears = [(128, 256, 4), (128, 128, 4), (128, 704, 4), (352, 128, 4), (128, 2048, 1)]
    xs = [(torch.randn(512, 2, i, generator=g), torch.randn(o, i, generator=g), torch.randn(1024, o, generator=g),
           torch.zeros(o, i), n) for i, o, n in linears]

    def forward_gemms(fn):
        def run():
            for x, w, _, _, n in xs:
                for _ in range(n):
                    fn(x, w)
        return run

    def wgrad_gemms(fn):
        def run():
            for x, _, gy, mg, n in xs:
                for _ in range(n):
                    fn(x.view(1024, -1), gy, mg)
        return run

    show("forward GEMMs, one micro batch", "matmul(x, w.t())", "F.linear", paired(
        forward_gemms(lambda x, w: torch.matmul(x, w.t())), forward_gemms(F.linear), args.reps))
    show("wgrad GEMMs into main_grad", "addmm_(g.t(), x)", "transposed", paired(
        wgrad_gemms(lambda x, gy, mg: mg.addmm_(gy.t(), x)),
        wgrad_gemms(lambda x, gy, mg: mg.t().addmm_(x.t(), gy)), args.reps))

    # GEMMs of a whole step, engine vs transformers, alternating profiled steps: total self time
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(tt.hf_config(bargs)).save_pretrained(d)
        hf = tt.HFLoop(bargs, d)
    gemm = {"engine": [], "transformers": []}
    calls = {}
    for r in range(max(4, args.reps // 4)):
        for name, step in ((("engine", eng.step), ("transformers", hf.step)) if r % 2 == 0 else
                           (("transformers", hf.step), ("engine", eng.step))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(batches)
            ev = [e for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")]
            gemm[name].append(sum(e.self_cpu_time_total for e in ev) / 1e3)
            calls[name] = sum(e.count for e in ev)
    print(f"{'GEMMs of one step (profiled)':34s} engine {statistics.median(gemm['engine']):7.1f} ms in {calls['engine']} calls "
          f"| transformers {statistics.median(gemm['transformers']):7.1f} ms in {calls['transformers']} calls "
          f"| ratio {statistics.median([a / b for a, b in zip(gemm['engine'], gemm['transformers'])]):.2f}", flush=True)

    # fixed per-step cost: 2 micro batches of 16 tokens, full step (engine vs transformers loop)
    small = tt._args(["--seq", "16", "--micro-batch", "1"])

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(tt.hf_config(small)).save_pretrained(d)
        eng_s, hf_s = tt.Engine(small, hf_dir=d), tt.HFLoop(small, d)
    sb = [tt.micro_batch(t, 1, g) for t in tt.token_batches(small, 2048)]
    from megatron_mft.compat import cpu, megatron_fixes

    def hf_step(batches):  # as in its --compare-hf worker: no CPU shim in that process
        with cpu._mode_paused() if cpu._active and cpu._mode_on_top() else contextlib.nullcontext():
            hf_s.step(batches)

    show("whole step, 2 x 16 tokens", "engine", "transformers", paired(partial(eng_s.step, sb), partial(hf_step, sb),
                                                                         args.reps))

    # the third round's changes, each switched off and on in the same engine (2 x 16 tokens, 3 steps)
    def steps_with(module, flag: str, value: bool):
        def run():
            setattr(module, flag, value)
            try:
                for _ in range(3):
                    eng_s.step(sb)
            finally:
                setattr(module, flag, True)
        return run

    if cpu._active:
        show("shim mode popped (3 steps)", "mode on", "popped", paired(
            steps_with(cpu, "pause_mode", False), steps_with(cpu, "pause_mode", True), args.reps))
    show("TP=1 region nodes (3 steps)", "megatron", "skipped", paired(
        steps_with(megatron_fixes, "one_rank_tp_shortcut", False),
        steps_with(megatron_fixes, "one_rank_tp_shortcut", True), args.reps))

    # clipping and grad norm over the tiny preset's gradients: megatron's Python loops vs foreach
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads

    grads = [torch.randn(s, generator=g) for s in shapes]
    flag = torch.zeros(1, dtype=torch.int)

    def clip(norm_impl, scale_impl):
        norm_impl(2048, flag, [grads], False)
        scale_impl(2048, flag, [grads, grads], 0.999999)

    show("grad norm + clip scale", "megatron loops", "foreach", paired(
        partial(clip, mutils.local_multi_tensor_l2_norm, mutils.local_multi_tensor_scale),
        partial(clip, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl), args.reps))

    # global-batch statistics of 8 micro batches: one per micro batch (as before) vs one flat pass
    from megatron_mft.loss.layout import build_layout, per_task_sum
    from megatron_mft.loss.stats import check_micro_batch

    mbs8 = [tt.micro_batch(t, 4, g) for t in tt.token_batches(tt._args(["--micro-batches", "8"]), 2048)]

    def stats_per_micro_batch():
        counts = torch.zeros(2, 1, dtype=torch.float64)
        for k, mb in enumerate(mbs8):
            check_micro_batch(mb, 1, where=f"micro batch {k}")
            lay = build_layout(mb, 1, torch.device("cpu"), torch.float64)
            counts[0] += per_task_sum(lay.mask.double(), lay.tok_task, 1)[:1]
            counts[1] += per_task_sum(lay.slot_live.double(), lay.slot_task, 1)[:1]
        return counts

    show("global-batch stats, 8 micro batches", "per micro batch", "one pass", paired(
        stats_per_micro_batch, partial(GlobalBatchStats.gather, mbs8, 1), args.reps))


if __name__ == "__main__":
    sys.exit(command(lambda argv: main() or 0)())
