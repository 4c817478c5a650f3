"""The engine's CPU fast paths give the same numbers as the paths they replace (issue 14):
the torch SwiGLU in megatron's fused bias+SwiGLU slot against megatron's unfused MLP, bit for
bit, and the single-rank collective shortcut of the CPU shim against what a one-rank reduction
or gather means."""

import copy

import pytest
import torch
import torch.nn.functional as F


def test_swiglu_function_is_bit_identical_to_autograd():
    from megatron_mft.model.swiglu import SwiGLU

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        y = torch.randn(3, 5, 2 * 7, generator=g, dtype=dtype)
        grad = torch.randn(3, 5, 7, generator=g, dtype=dtype)
        ref_in = y.clone().requires_grad_()
        a, b = torch.chunk(ref_in, 2, -1)
        ref = F.silu(a) * (b + 0.0)  # megatron's unfused glu (glu_linear_offset 0.0)
        ref.backward(grad)
        ours_in = y.clone().requires_grad_()
        out = SwiGLU.apply(ours_in)
        out.backward(grad)
        assert torch.equal(out, ref) and torch.equal(ours_in.grad, ref_in.grad)
    # and the arithmetic itself, against float64 by hand: d/dx silu(x) = s(x) (1 + x (1 - s(x)))
    y = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    SwiGLU.apply(y).backward(grad)
    x1, x2 = y.detach()[:, :3], y.detach()[:, 3:]
    s = torch.sigmoid(x1)
    expected = torch.cat((grad * x2 * s * (1 + x1 * (1 - s)), grad * x1 * s), -1)
    torch.testing.assert_close(y.grad, expected, rtol=1e-12, atol=1e-12)


def test_megatron_mlp_with_the_torch_swiglu_equals_the_unfused_mlp(tp1_env):
    from megatron.core.transformer import mlp as megatron_mlp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_mft.config import load_config
    from megatron_mft.model.builder import transformer_config
    from megatron_mft.model.swiglu import bias_swiglu

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=1"])
    fused = transformer_config(cfg.model.arch(), cfg.model, cfg.parallel, tp1_env)
    assert fused.bias_activation_fusion and megatron_mlp.bias_swiglu_impl is bias_swiglu
    unfused = copy.copy(fused)
    unfused.bias_activation_fusion = False
    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    torch.manual_seed(3)
    mlp_fused = MLP(fused, subs)
    mlp_plain = MLP(unfused, subs)
    mlp_plain.load_state_dict(mlp_fused.state_dict())
    x = torch.randn(16, 2, fused.hidden_size)
    outs = []
    for m in (mlp_fused, mlp_plain):
        xi = x.clone().requires_grad_()
        out, _ = m(xi)
        out.backward(torch.ones_like(out))
        outs.append((out, xi.grad, m.linear_fc1.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_single_rank_collectives_are_the_identity(single_process_group):
    import torch.distributed as dist

    from megatron_mft.compat import cpu

    if not cpu._active:
        pytest.skip("the shortcut is part of the CPU shim (a CUDA machine runs collectives as they are)")
    one = dist.new_group([0])
    t = torch.tensor([1.0, -2.0, 3.0])
    # the profiler sees every call that enters c10d (gloo): the shortcut's calls must not
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.AVG):
            x = t.clone()
            assert dist.all_reduce(x, op=op, group=one) is None
            assert torch.equal(x, t)
        out = torch.zeros(3)
        dist.all_gather_into_tensor(out, t, group=one)
        assert torch.equal(out, t)
        out = torch.zeros(3)
        dist.reduce_scatter_tensor(out, t, group=one)
        assert torch.equal(out, t)
    assert not [e.name for e in prof.events() if e.name.startswith(("c10d::", "gloo:"))]
    x = t.clone()  # asynchronous calls still go through gloo and hand back a work handle
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dist.all_reduce(x, group=one, async_op=True).wait()
    assert torch.equal(x, t)
    assert [e.name for e in prof.events() if e.name.startswith("c10d::allreduce")]  # the probe sees gloo calls


def _tiny_engine(env, seed: int, extra=()):
    """The recipe's pieces at TP=PP=1 on a 2-layer tiny model: chunks, DDP, optimizer, context."""
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_mft.training.parallel import init_parallel
    from megatron_mft.training.step import StepContext, install_grad_finalizer

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2", "data.seq_length=32",
                             "train.micro_batch_size=1", "train.warmup_steps=0", *extra])
    init_parallel(cfg.parallel, env, seed)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.parallel, env), cfg)
    install_grad_finalizer(chunks)
    opt = build_optimizer(chunks, cfg)
    ctx = StepContext(loss_cfg=cfg.loss, task_names=["a", "b", "c"], device=torch.device("cpu"), packed=True)
    return chunks, opt, build_scheduler(opt, cfg, 10), ctx, cfg.model.arch().vocab_size


def _packed_micro_batches(vocab: int, seed: int, n: int = 2, seq: int = 32) -> list[dict]:
    """n packed rows of seq tokens, 3 documents each, documents of 3 tasks, last token of each without loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = [9, 7, seq - 16]
        tokens = torch.randint(0, vocab, (1, seq), generator=g)
        sample = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).reshape(1, seq)
        last = torch.cat([torch.arange(k) == k - 1 for k in lengths]).reshape(1, seq)
        out.append(dict(tokens=tokens, labels=torch.where(last, 0, tokens.roll(-1, 1)), loss_mask=(~last).float(),
                        task_ids=(sample + len(out)) % 3, sample_ids=sample,
                        position_ids=torch.cat([torch.arange(k) for k in lengths]).reshape(1, seq),
                        cu_seqlens=torch.tensor([0, 9, 16, seq], dtype=torch.int32), max_seqlen=max(lengths)))
    return out


def _three_steps(env, mode: str = "task-sample"):
    """Losses, grad norms and the weights after three steps (bit patterns compared by the callers)."""
    import dataclasses

    from megatron_mft.training.step import train_step

    chunks, opt, sched, ctx, vocab = _tiny_engine(env, seed=5)
    ctx.loss_cfg = dataclasses.replace(ctx.loss_cfg, mode=mode)
    batches = _packed_micro_batches(vocab, seed=6)
    metrics = [train_step(chunks, opt, sched, batches, ctx) for _ in range(3)]
    return metrics, [p.detach().clone() for c in chunks for p in c.parameters()]


def test_cpu_shim_mode_is_paused_in_micro_batch_steps_and_changes_no_number(single_process_group):
    """The shim's function mode costs ~3 us per Python-level torch call; megatron's per-micro-batch
    forward_step / backward_step of a dense model hold no CUDA literal, so they run without it.
    Same losses, grad norms and weights, bit for bit, with the pause on and off."""
    from megatron_mft.compat import cpu

    if not cpu._active:
        pytest.skip("the function mode is part of the CPU shim (a CUDA machine has none)")
    seen = []
    from megatron.core.transformer.transformer_layer import TransformerLayer

    def probe(module, args):
        n = torch._C._len_torch_function_stack()
        seen.append(n > 0 and torch._C._get_function_stack_at(n - 1) is cpu._mode)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: probe(m, a) if isinstance(m, TransformerLayer) else None)
    try:
        paused, w_paused = _three_steps(single_process_group)
    finally:
        handle.remove()
    assert seen and not any(seen), "the CPU shim's mode was on the stack inside the model's forward"
    assert torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) is cpu._mode  # back after
    cpu.pause_mode = False
    try:
        moded, w_moded = _three_steps(single_process_group)
    finally:
        cpu.pause_mode = True
    assert [repr(m) for m in paused] == [repr(m) for m in moded]
    assert all(torch.equal(a, b) for a, b in zip(w_paused, w_moded))
    assert paused[0]["grad_norm"] > 0 and paused[2]["loss"] < paused[0]["loss"]  # it trained


def test_global_batch_stats_in_one_pass_count_what_a_loop_over_tokens_counts():
    """GlobalBatchStats.gather flattens the step's micro batches into one pass; counts against a
    plain Python loop over every token (a sample is a (micro batch, sample id) with a loss token),
    and a broken micro batch is still named by its index."""
    from megatron_mft.loss import GlobalBatchStats

    g = torch.Generator().manual_seed(11)
    nt, mbs = 4, []
    for k in range(5):
        b, s = 1 + k % 2, 7 + 3 * k
        sid = torch.randint(-1, b * s // 3, (b, s), generator=g)
        task_of = torch.randint(0, nt, (b * s,), generator=g)
        tid = torch.where(sid >= 0, task_of[sid.clamp_min(0)], -1)
        lm = (torch.rand(b, s, generator=g) > 0.3).float() * (sid >= 0)
        mbs.append(dict(loss_mask=lm, sample_ids=sid, task_ids=tid))
    tokens, samples = [0.0] * nt, [set() for _ in range(nt)]
    for k, mb in enumerate(mbs):
        for m, s_, t in zip(mb["loss_mask"].reshape(-1).tolist(), mb["sample_ids"].reshape(-1).tolist(),
                            mb["task_ids"].reshape(-1).tolist()):
            if m > 0:
                tokens[t] += 1
                samples[t].add((k, s_))
    stats = GlobalBatchStats.gather(mbs, nt)
    assert stats.task_tokens.tolist() == tokens and stats.task_samples.tolist() == [float(len(x)) for x in samples]
    assert stats.task_tokens.dtype == torch.float64 and sum(tokens) > 0 and min(len(x) for x in samples) > 0
    assert GlobalBatchStats.gather([], nt).task_tokens.tolist() == [0.0] * nt
    bad = dict(mbs[3], task_ids=mbs[3]["task_ids"].clone())
    bad["task_ids"][bad["sample_ids"] == int(bad["sample_ids"].max())] = torch.tensor([0, 1]).repeat(8)[
        : int((bad["sample_ids"] == int(bad["sample_ids"].max())).sum())]
    with pytest.raises(ValueError, match="micro batch 3: a sample spans more than one task id"):
        GlobalBatchStats.gather(mbs[:3] + [bad], nt)
    with pytest.raises(ValueError, match=r"micro batch 1: sample_ids must be in \[-1, b\*s\)"):
        GlobalBatchStats.gather([mbs[0], dict(mbs[1], sample_ids=mbs[1]["sample_ids"] + 100)], nt)


def test_foreach_stand_ins_for_clipping_equal_megatrons_loops_bit_for_bit():
    """Without Apex/TE, megatron clips and measures the grad norm through Python loops
    (megatron.core.utils.local_multi_tensor_*); megatron_fixes puts torch's foreach ops there."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from megatron_mft.compat import megatron_fixes, probe

    env = probe()
    if env.apex or env.te:
        pytest.skip("with Apex or TE megatron uses their multi-tensor kernels")
    megatron_fixes.apply()
    assert clip_grads.l2_norm_impl.func is megatron_fixes._multi_tensor_l2_norm
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=g) * 10 ** (i % 5 - 2) for i, s in enumerate([(3, 5), (7,), (64, 33), (1,), (130, 17)])]
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = clip_grads.l2_norm_impl(2048, flag, [grads], False)
    ref = torch.norm(torch.tensor([[torch.norm(t) for t in grads]]))  # megatron's loop, as written there
    assert ours.dtype == torch.float32 and torch.equal(ours, ref.reshape(1))
    scaled = [t.clone() for t in grads]
    clip_grads.multi_tensor_scale_impl(2048, flag, [scaled, scaled], 0.3712)
    looped = [t.clone() for t in grads]
    utils.local_multi_tensor_scale(2048, flag, [looped, looped], 0.3712)
    assert all(torch.equal(a, b) for a, b in zip(scaled, looped))
    assert not torch.equal(scaled[0], grads[0])
    other = [torch.zeros_like(t) for t in grads]  # distinct source and destination: megatron's loop
    clip_grads.multi_tensor_scale_impl(2048, flag, [grads, other], 0.5)
    assert all(torch.equal(o, t * 0.5) for o, t in zip(other, grads))


def test_one_rank_tensor_parallel_regions_are_skipped_bit_for_bit(tp1_env):
    """At TP = 1 megatron's copy-to / reduce-from regions around every parallel linear are
    identity autograd nodes; init_parallel skips them (megatron_fixes.skip_one_rank_tp_regions).
    Same outputs and gradients, bit for bit, also for an input whose size-1 dim has an odd
    stride (a [1, N, H] row transposed, as packed rows are): the GEMM path depends on it."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_mft.compat import megatron_fixes
    from megatron_mft.config import load_config
    from megatron_mft.model.builder import transformer_config

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=1"])
    tc = transformer_config(cfg.model.arch(), cfg.model, cfg.parallel, tp1_env)
    init = torch.nn.init.normal_
    torch.manual_seed(4)
    col = ColumnParallelLinear(128, 384, config=tc, init_method=init, bias=False, gather_output=False)
    row = RowParallelLinear(384, 128, config=tc, init_method=init, bias=False, input_is_parallel=True,
                            skip_bias_add=True)
    x0 = torch.randn(1, 160, 128).transpose(0, 1)  # [160, 1, 128], strides (128, 20480, 1)
    runs = []
    for shortcut in (True, False):
        megatron_fixes.one_rank_tp_shortcut = shortcut
        try:
            x = x0.detach().transpose(0, 1).clone().transpose(0, 1).requires_grad_()
            col.zero_grad(), row.zero_grad()
            col.weight.requires_grad_(False)  # frozen, as under LoRA: megatron's frozen-weight GEMM
            frozen = col(x.detach())[0]
            col.weight.requires_grad_(True)
            y, _ = row(torch.nn.functional.silu(col(x)[0]) + frozen)
            y.backward(torch.ones_like(y))
            nodes, stack = set(), [y.grad_fn]
            while stack:
                fn = stack.pop()
                if fn is not None and fn not in nodes:
                    nodes.add(fn)
                    stack.extend(f for f, _ in fn.next_functions)
            runs.append((y.detach(), x.grad, col.weight.grad, row.weight.grad,
                         sorted(type(n).__name__ for n in nodes)))
        finally:
            megatron_fixes.one_rank_tp_shortcut = True
    (a, *ga, names_a), (b, *gb, names_b) = runs
    assert x0.stride() == (128, 160 * 128, 1)
    assert torch.equal(a, b) and all(torch.equal(p, q) for p, q in zip(ga, gb))
    assert "_CopyToModelParallelRegionBackward" in names_b and "_ReduceFromModelParallelRegionBackward" in names_b
    assert not any("ModelParallelRegion" in n for n in names_a)  # init_parallel installed the shortcut


@pytest.mark.parametrize("bias,tokens", [(False, 160), (True, 160), (False, 1024)])
def test_cpu_linears_are_bit_identical_to_megatrons(tp1_env, bias, tokens):
    """Without CUDA the model builder (model/linear.py) sends a linear call that needs no
    communication through ``F.linear`` under torch's autograd (the weight gradient to ``.grad``,
    which DDP's hook adds into main_grad), and the calls that do communicate through subclasses of
    megatron's Functions whose forward GEMM is ``F.linear``. Against megatron's own entry points
    and Functions (the weight gradient into main_grad by our stand-in for Apex's kernel, megatron's
    DDP hook rule emulated after each backward): the same outputs, input gradients and main_grad
    after the first micro batch, bit for bit, trainable and frozen (LoRA's base), also for an input
    whose size-1 dim has an odd stride (packed rows); after the second, main_grad is bit for bit the
    same at 160 tokens, and within float32 rounding at 1024 (``addmm_`` into a non-zero main_grad
    blocks the token dimension otherwise than a product followed by ``add_``). No Python autograd
    node on the local path. The subclasses are also checked directly (their backward is megatron's)."""
    from types import SimpleNamespace

    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, layers

    from megatron_mft.config import load_config
    from megatron_mft.model import linear
    from megatron_mft.model.builder import transformer_config
    from megatron_mft.training.optimizer import _wgrad_gemm_accum

    megatron_fns = (linear._TrainableLinear.__mro__[1], linear._FrozenLinear.__mro__[1])
    assert megatron_fns[0].__module__ == layers.__name__ and megatron_fns[1].__module__ == layers.__name__
    cfg = load_config(None, ["data.path=/unused", "model.num_layers=1"])
    tc = transformer_config(cfg.model.arch(), cfg.model, cfg.parallel, tp1_env)
    ours_state = (layers.LinearWithGradAccumulationAndAsyncCommunication, layers.LinearWithFrozenWeight,
                  layers.linear_with_grad_accumulation_and_async_allreduce, layers.linear_with_frozen_weight)
    assert ours_state == (linear._TrainableLinear, linear._FrozenLinear, linear.linear_trainable,
                          linear.linear_frozen)  # the builder installed them
    megatron_state = (*megatron_fns, linear._megatron_trainable, linear._megatron_frozen)
    torch.manual_seed(7)
    col = ColumnParallelLinear(128, 384, config=tc, init_method=torch.nn.init.normal_, bias=bias, gather_output=False)
    row = RowParallelLinear(384, 128, config=tc, init_method=torch.nn.init.normal_, bias=bias, input_is_parallel=True,
                            skip_bias_add=False)
    x0 = torch.randn(1, tokens, 128).transpose(0, 1)  # [tokens, 1, 128], strides (128, tokens * 128, 1)
    params = [p for m in (col, row) for p in m.parameters()]
    # a step starts from zeroed buffers (DDP's zero_grad_buffer); at 160 tokens any start gives the same bits
    main0 = {p: torch.randn(p.shape) if tokens <= 256 else torch.zeros(p.shape) for p in params}

    def run(state, direct: bool):
        (layers.LinearWithGradAccumulationAndAsyncCommunication, layers.LinearWithFrozenWeight,
         layers.linear_with_grad_accumulation_and_async_allreduce, layers.linear_with_frozen_weight) = state
        saved = (getattr(layers, "fused_weight_gradient_mlp_cuda", None), layers._grad_accum_fusion_available)
        layers.fused_weight_gradient_mlp_cuda = SimpleNamespace(wgrad_gemm_accum_fp32=_wgrad_gemm_accum)
        layers._grad_accum_fusion_available = True
        try:
            out, nodes = [], set()
            for p in params:
                p.grad = None
                p.main_grad = main0[p].clone()
                p.grad_added_to_main_grad = False  # as DDP's zero_grad_buffer
            for m in (col, row):
                m.gradient_accumulation_fusion = True

            def lin(m, x):  # direct: the autograd Functions themselves (megatron's or the subclasses)
                if not direct:
                    return m(x)[0]
                fn = layers.LinearWithGradAccumulationAndAsyncCommunication if m.weight.requires_grad \
                    else layers.LinearWithFrozenWeight
                args = ((x, m.weight, m.bias, True, False, False, None, None, m.tp_group) if m.weight.requires_grad
                        else (x, m.weight, m.bias, False, m.tp_group))
                return fn.apply(*args)

            for _ in range(2):  # accumulation into main_grad over two micro batches
                x = x0.detach().transpose(0, 1).clone().transpose(0, 1).requires_grad_()
                col.weight.requires_grad_(False)  # frozen, as under LoRA
                frozen = lin(col, x)
                col.weight.requires_grad_(True)
                y = lin(row, torch.nn.functional.silu(lin(col, x)) + frozen)
                stack, seen = [y.grad_fn], set()
                while stack:  # every node of the graph
                    fn = stack.pop()
                    if fn is not None and fn not in seen:
                        seen.add(fn)
                        nodes.add(type(fn).__name__)
                        stack.extend(f for f, _ in fn.next_functions)
                y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
                for p in params:  # megatron DDP's post-accumulation hook
                    if p.grad is not None and not p.grad_added_to_main_grad:
                        p.main_grad.add_(p.grad)
                    p.grad = None
                out += [y.detach(), x.grad] + ([p.main_grad.clone() for p in params] if not out else [])
            return out + [p.main_grad for p in params], nodes
        finally:
            (layers.LinearWithGradAccumulationAndAsyncCommunication, layers.LinearWithFrozenWeight,
             layers.linear_with_grad_accumulation_and_async_allreduce, layers.linear_with_frozen_weight) = ours_state
            layers.fused_weight_gradient_mlp_cuda, layers._grad_accum_fusion_available = saved
            for m in (col, row):
                m.gradient_accumulation_fusion = False
            for p in params:
                del p.main_grad, p.grad_added_to_main_grad

    ours, our_nodes = run(ours_state, direct=False)
    theirs, their_nodes = run(megatron_state, direct=False)
    sub, _ = run(ours_state, direct=True)
    meg, _ = run(megatron_state, direct=True)
    n = len(params)
    assert len(ours) == len(theirs) == len(sub) == len(meg) == 4 + 2 * n
    exact = len(ours) if tokens <= 256 else len(ours) - n  # the second micro batch's accumulation
    for i, (a, b, c, d) in enumerate(zip(ours, theirs, sub, meg)):
        assert torch.equal(c, d), i
        if i < exact:
            assert torch.equal(a, b), i
        else:
            # two orders of one fp32 sum over 2 x 1024 tokens: rounding grows like sqrt(terms) x eps; the
            # bound is 8x that (measured: 2e-7 of the largest entry here, 2.8e-7 on CI's CPU), a missing or
            # doubled micro batch is off by O(1)
            bound = 8 * (2 * tokens) ** 0.5 * torch.finfo(torch.float32).eps * b.abs().max().item()
            assert torch.allclose(a, b, rtol=0, atol=bound), (i, (a - b).abs().max(), bound)
    assert not torch.equal(ours[-1 - bias], main0[row.weight])  # the weight gradient was accumulated
    assert {"LinearWithFrozenWeightBackward", "LinearWithGradAccumulationAndAsyncCommunicationBackward"} <= their_nodes
    # no Python node on the local path; a trainable bias keeps the Functions (megatron's bits)
    assert ("_FrozenLinearBackward" in our_nodes) == ("_TrainableLinearBackward" in our_nodes) == bias, our_nodes
    assert not any(n.startswith("LinearWith") for n in our_nodes), our_nodes


def test_cuda_weight_gradient_accumulates_in_one_gemm(tp1_env):
    """On a GPU without apex, megatron's linear backward hands the weight gradient to our stand-in
    for apex's ``wgrad_gemm_accum_fp32`` (training/optimizer.py). With bf16 activations and a
    float32 main_grad it must be one GEMM writing main_grad in place (``addmm`` with
    ``out_dtype``, beta 1), not a bf16 product followed by an add (9% of a full fine-tuning step
    on an H200, and the bf16 rounding of each micro batch's gradient). Checked on ``meta``, the
    placement tests' stand-in for CUDA: the CPU backend has no mixed-dtype GEMM. The numbers
    (against float64) are checked on the GPU (tests/gpu/gpu_checks.py wgrad)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_mft.compat.cpu import cuda_redirected_to
    from megatron_mft.model import linear
    from megatron_mft.training.optimizer import MIXED_DTYPE_ADDMM_DEVICES, accumulate_wgrad_into_main_grad

    assert MIXED_DTYPE_ADDMM_DEVICES == ("cuda", "meta")  # meta plays CUDA here
    accumulate_wgrad_into_main_grad([])  # installs the stand-in where apex is missing

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with cuda_redirected_to("meta") as device:
        x = torch.empty(64, 1, 32, dtype=torch.bfloat16, device=device, requires_grad=True)
        weight = torch.nn.Parameter(torch.empty(48, 32, dtype=torch.bfloat16, device=device))
        weight.main_grad = torch.empty(48, 32, dtype=torch.float32, device=device)
        weight.grad_added_to_main_grad = False
        # megatron's own entry point (the CPU build replaces the module attribute, not this)
        y = linear._megatron_trainable(x, weight, None, True, False, False)
        with Ops() as ops:
            y.backward(torch.empty_like(y))
    gemms = [(f, a, k) for f, a, k in ops.calls if f in (torch.ops.aten.addmm.dtype_out, torch.ops.aten.mm.default)]
    wgrad = [(a, k) for f, a, k in gemms if f is torch.ops.aten.addmm.dtype_out]
    assert len(wgrad) == 1, [str(f) for f, _, _ in ops.calls]
    args, kwargs = wgrad[0]
    assert args[0] is weight.main_grad and kwargs["out"] is weight.main_grad  # beta 1 (default), in place
    assert args[1].dtype == args[2].dtype == torch.bfloat16 and torch.float32 in (*args[3:], *kwargs.values())
    assert not any(f is torch.ops.aten.add_.Tensor for f, _, _ in ops.calls)  # no separate accumulation pass
    assert weight.grad_added_to_main_grad  # megatron's DDP hook then adds nothing


def test_weight_gradient_falls_back_where_mixed_dtype_addmm_is_missing(monkeypatch):
    """A torch whose addmm cannot take bf16 operands into a float32 output on the device (the CPU
    backend plays such a torch here: it has no kernel for it) gets the product and the add, the
    same numbers as before the one-GEMM form, with one warning; a later call goes straight there.
    Running out of memory there is raised, not taken for a missing kernel."""
    from megatron_mft.training import optimizer

    monkeypatch.setattr(optimizer, "MIXED_DTYPE_ADDMM_DEVICES", ("cpu",))
    monkeypatch.setattr(optimizer, "_mixed_addmm_works", {})
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(64, n, generator=g).to(torch.bfloat16) for n in (32, 48))
    main0 = torch.randn(48, 32, generator=g)
    main_grad = main0.clone()
    with pytest.warns(UserWarning, match="no mixed-dtype addmm on cpu"):
        optimizer._wgrad_gemm_accum(x, dy, main_grad)
    assert torch.equal(main_grad, main0 + dy.t().mm(x))
    assert optimizer._mixed_addmm_works == {"cpu": False}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer._wgrad_gemm_accum(x, dy, main_grad)
    assert torch.equal(main_grad, main0 + dy.t().mm(x) + dy.t().mm(x))
    # running out of memory is not a missing kernel: raised, and the one-GEMM form stays in use
    monkeypatch.setattr(optimizer, "_mixed_addmm_works", {})

    def oom(*a, **k):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(optimizer.torch, "addmm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        optimizer._wgrad_gemm_accum(x, dy, main_grad)
    assert optimizer._mixed_addmm_works == {}
