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
