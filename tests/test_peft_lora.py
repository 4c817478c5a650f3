"""LoRA / QLoRA on one process (gloo, world size 1): identity at init, freezing and the
optimizer, merge / un-merge, adapter-only checkpoints, NF4 error and QLoRA forward, hand count.

The TP=2 (with/without sequence parallelism) and PP=2 checks are in test_peft_tp.py.
"""

from __future__ import annotations

import pytest
import torch

SEED = 1234
B, S = 2, 32


@pytest.fixture(scope="module")
def env(single_process_group):
    """The suite's world-size-1 gloo group (tests/conftest.py) with TP=PP=1 parallel state."""
    from megatron.core import parallel_state as ps

    from megatron_mft.config import ParallelConfig
    from megatron_mft.training.parallel import init_parallel

    init_parallel(ParallelConfig(), single_process_group, SEED)
    yield single_process_group
    ps.destroy_model_parallel()


def _model_cfg():
    from megatron_mft.config import ModelConfig

    return ModelConfig(preset="tiny", precision="fp32")


def _build(env, method="none", rank=8, targets=None, dropout=0.0, rslora=False, prepare=True):
    from megatron_mft.config import ParallelConfig, PeftConfig
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan

    torch.manual_seed(SEED)
    if method == "none":
        return None, build_model_chunks(_model_cfg(), ParallelConfig(), env)
    cfg = PeftConfig(method=method, rank=rank, alpha=16.0, dropout=dropout, rslora=rslora)
    if targets is not None:
        cfg.target_modules = list(targets)
    plan = PeftPlan(cfg, env, seed=SEED)
    chunks = build_model_chunks(_model_cfg(), ParallelConfig(), env, layer=plan.layer_spec(_model_cfg()))
    if prepare:
        plan.prepare(chunks)
    return plan, chunks


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 2048, (B, S + 1), generator=g)
    return ids[:, :-1], torch.arange(S).expand(B, S), ids[:, 1:]


def _set_nonzero_b(chunks, scale=0.05):
    from megatron_mft.peft import iter_adapters

    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, m in iter_adapters(chunks):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def base_ckpt(env, tmp_path_factory):
    """A base (non-PEFT) model saved as a megatron dist checkpoint, and its logits."""
    from megatron_mft.checkpoint.dist import save_checkpoint

    _, chunks = _build(env)
    root = tmp_path_factory.mktemp("base")
    path = save_checkpoint(root, 1, chunks, common={}, run_info={})
    ids, pos, _ = _batch()
    with torch.no_grad():
        logits = chunks[0](ids, pos, None)
    weights = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    return path, logits, weights


def test_layer_spec_swaps_only_targets(env):
    from megatron_mft.peft import LoraColumnParallelLinear, LoraRowParallelLinear

    _, chunks = _build(env, "lora", targets=["linear_qkv", "linear_fc2"])
    layer = chunks[0].decoder.layers[0]
    assert type(layer.self_attention.linear_qkv) is LoraColumnParallelLinear
    assert type(layer.mlp.linear_fc2) is LoraRowParallelLinear
    assert type(layer.self_attention.linear_proj).__name__ == "RowParallelLinear"
    assert type(layer.mlp.linear_fc1).__name__ == "ColumnParallelLinear"
    qkv = layer.self_attention.linear_qkv
    # naming contract: base weight at <path>.weight, adapters at <path>.lora_A/B.weight
    names = dict(chunks[0].named_parameters())
    p = "decoder.layers.0.self_attention.linear_qkv"
    assert names[f"{p}.weight"].shape == (256, 128)
    assert names[f"{p}.lora_A.weight"].shape == (8, 128)
    assert names[f"{p}.lora_B.weight"].shape == (256, 8)
    assert qkv.scaling == 16.0 / 8


def test_lora_at_init_gives_base_logits(env, base_ckpt):
    from megatron_mft.checkpoint.dist import load_model_weights

    path, ref_logits, _ = base_ckpt
    _, chunks = _build(env, "lora")
    load_model_weights(path, chunks)  # a base checkpoint loads unchanged into the LoRA model
    ids, pos, _ = _batch()
    with torch.no_grad():
        out = chunks[0](ids, pos, None)
    assert torch.equal(out, ref_logits)
    for _, m in __import__("megatron_mft.peft", fromlist=["iter_adapters"]).iter_adapters(chunks):
        assert m.lora_A.weight.abs().sum() > 0 and m.lora_B.weight.abs().sum() == 0


def test_adapters_are_deterministic_by_name(env):
    from megatron_mft.peft import iter_adapters

    _, c1 = _build(env, "lora")
    _, c2 = _build(env, "lora")
    a1 = {n: m.lora_A.weight.clone() for n, m in iter_adapters(c1)}
    a2 = {n: m.lora_A.weight.clone() for n, m in iter_adapters(c2)}
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert not torch.equal(a1["decoder.layers.0.mlp.linear_fc1"], a1["decoder.layers.1.mlp.linear_fc1"])
    bound = 1 / 128 ** 0.5
    assert a1["decoder.layers.0.mlp.linear_fc1"].abs().max() <= bound


@pytest.mark.parametrize("rank, targets", [(8, None), (4, ["linear_qkv", "linear_proj"]), (16, ["linear_fc2"])])
def test_trainable_share_matches_hand_count(env, rank, targets):
    plan, chunks = _build(env, "lora", rank=rank, targets=targets)
    # tiny: h=128, 4 heads / 2 groups of 32 -> kv=64, f=352, 4 layers, vocab 2048
    per_target = {"linear_qkv": 128 + (128 + 2 * 64), "linear_proj": 128 + 128,
                  "linear_fc1": 128 + 2 * 352, "linear_fc2": 352 + 128}
    hand = 4 * rank * sum(per_target[t] for t in (targets or per_target))
    base_total = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 352 + 2 * 128) + 2 * 2048 * 128 + 128
    assert plan.counts == {"trainable": hand, "total": base_total + hand, "nf4": 0}
    from megatron_mft.peft.memory import lora_params

    assert lora_params(_model_cfg().arch(), rank, targets or list(per_target)) == hand
    assert sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad) == hand
    line = plan.trainable_line()
    assert f"trainable {hand:,} of {base_total + hand:,}" in line
    assert f"({100 * hand / (base_total + hand):.3f}%)" in line


def test_only_adapters_train(env, base_ckpt):
    from megatron.core.distributed import finalize_model_grads

    from megatron_mft.checkpoint.dist import load_model_weights
    from megatron_mft.config import RunConfig
    from megatron_mft.training.optimizer import build_optimizer, wrap_ddp

    path, _, _ = base_ckpt
    plan, chunks = _build(env, "lora")
    load_model_weights(path, chunks)
    plan.prepare(chunks)
    run = RunConfig()
    run.model = _model_cfg()
    run.train.lr = 1e-2
    ddp = wrap_ddp(chunks, run)
    opt = build_optimizer(ddp, run)
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p.numel() for p in opt_params) == plan.counts["trainable"]
    assert sum(b.numel_unpadded for b in ddp[0].buffers) == plan.counts["trainable"]
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    ids, pos, labels = _batch()
    for _ in range(2):
        ddp[0].zero_grad_buffer()
        opt.zero_grad()
        ddp[0](ids, pos, None, labels=labels).sum().backward()
        finalize_model_grads(ddp)
        ok, _, _ = opt.step()
        assert ok
    for n, p in chunks[0].named_parameters():
        if ".lora_" in n:
            assert not torch.equal(p, before[n]), f"adapter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_merge_unmerge(env):
    from megatron_mft.peft import iter_adapters, merge_adapters, unmerge_adapters

    _, chunks = _build(env, "lora")
    _set_nonzero_b(chunks)
    ids, pos, _ = _batch()
    w0 = {n: m.weight.detach().clone() for n, m in iter_adapters(chunks)}
    with torch.no_grad():
        ref = chunks[0](ids, pos, None)
        assert merge_adapters(chunks) == 16
        merged = chunks[0](ids, pos, None)
        once = {n: m.weight.detach().clone() for n, m in iter_adapters(chunks)}
        merge_adapters(chunks)  # merging again must not add the delta twice
        assert all(torch.equal(m.weight, once[n]) for n, m in iter_adapters(chunks))
        unmerge_adapters(chunks)
        again = chunks[0](ids, pos, None)
    assert not torch.equal(ref, torch.zeros_like(ref))
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref, atol=1e-6, rtol=1e-6)
    for n, m in iter_adapters(chunks):
        torch.testing.assert_close(m.weight, w0[n], atol=1e-6, rtol=0)
        assert not torch.equal(m.delta_weight(), torch.zeros_like(m.weight))
    w1 = {n: m.weight.detach().clone() for n, m in iter_adapters(chunks)}
    merge_adapters(chunks, keep_original=True)
    assert not any(torch.equal(m.weight, w1[n]) for n, m in iter_adapters(chunks))
    unmerge_adapters(chunks)
    assert all(torch.equal(m.weight, w1[n]) for n, m in iter_adapters(chunks))  # bit-exact


def test_checkpoint_holds_only_adapters(env, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import finalize_model_grads

    from megatron_mft.checkpoint.dist import load_checkpoint, save_checkpoint
    from megatron_mft.config import RunConfig
    from megatron_mft.peft import iter_adapters
    from megatron_mft.training.optimizer import build_optimizer, wrap_ddp

    for method in ("lora", "qlora"):
        plan, chunks = _build(env, method)
        _set_nonzero_b(chunks)
        run = RunConfig()
        run.model = _model_cfg()
        ddp = wrap_ddp(chunks, run)
        opt = build_optimizer(ddp, run)
        ids, pos, labels = _batch()  # one step: megatron's optimizer has no state to save before it
        ddp[0](ids, pos, None, labels=labels).sum().backward()
        finalize_model_grads(ddp)
        opt.step()
        path = save_checkpoint(tmp_path / method, 3, chunks, opt, common={"step": 3}, run_info={"peft": method},
                               trainable_only=True)
        keys = list(dist_checkpointing.load_tensors_metadata(str(path)).keys())
        model_keys = [k for k in keys if "optimizer" not in k]
        assert model_keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in model_keys), model_keys
        assert len(model_keys) == 8  # 4 targets x {A, B}, layers stacked along a leading axis
        assert all(".lora_" in k for k in keys), [k for k in keys if ".lora_" not in k]
        # load into a fresh model: adapters come back, base untouched
        _, fresh = _build(env, method)
        load_checkpoint(path, fresh, trainable_only=True)
        got = dict(iter_adapters(fresh))
        for n, m in iter_adapters(chunks):
            assert torch.equal(got[n].lora_B.weight, m.lora_B.weight)
            assert torch.equal(got[n].lora_A.weight, m.lora_A.weight)


def test_nf4_dequantises_within_nf4_error(env, base_ckpt):
    from megatron_mft.peft import NF4_BYTES_PER_PARAM, NF4Weight, iter_adapters, load_base_weights

    path, _, ref = base_ckpt
    plan, chunks = _build(env, "qlora", prepare=False)
    load_base_weights(path, chunks)
    plan.prepare(chunks)
    errs = []
    for name, m in iter_adapters(chunks):
        assert isinstance(m.weight, NF4Weight) and "weight" not in dict(m.named_parameters())
        w = ref[f"{name}.weight"]
        deq = m.base_weight()
        errs.append(((deq - w).norm() / w.norm()).item())
        assert m.weight.nbytes() <= NF4_BYTES_PER_PARAM * w.numel() + 4 * 300  # + code books
    assert max(errs) < 0.11 and min(errs) > 0.05, errs  # NF4 on Gaussian weights: ~0.09
    # embeddings, norms and the output layer stay dense and exact
    names = dict(chunks[0].named_parameters())
    for k in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
              "decoder.layers.0.input_layernorm.weight"):
        assert torch.equal(names[k], ref[k])
    assert plan.counts["nf4"] == 4 * (128 * 256 + 128 * 128 + 128 * 704 + 352 * 128)


def test_qlora_forward_matches_dequantised_forward(env):
    from megatron_mft.peft import iter_adapters

    plan, chunks = _build(env, "qlora")
    _set_nonzero_b(chunks)
    ids, pos, labels = _batch()

    def run():
        for c in chunks:
            c.zero_grad(set_to_none=True)
        loss = chunks[0](ids, pos, None, labels=labels)
        loss.sum().backward()
        logits = chunks[0](ids, pos, None).detach()
        return logits, {n + k: getattr(m, k).weight.grad.clone() for n, m in iter_adapters(chunks)
                        for k in ("lora_A", "lora_B")}

    q_logits, q_grads = run()
    for _, m in iter_adapters(chunks):
        m.dequantize_base_()
        assert not m.weight.requires_grad
    d_logits, d_grads = run()
    torch.testing.assert_close(q_logits, d_logits, atol=1e-5, rtol=1e-5)
    for k in q_grads:
        torch.testing.assert_close(q_grads[k], d_grads[k], atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in q_grads.values())


def test_qlora_merge_keeps_nf4_codes(env):
    from megatron_mft.peft import NF4Weight, iter_adapters, merge_adapters, unmerge_adapters

    _, chunks = _build(env, "qlora")
    _set_nonzero_b(chunks)
    ids, pos, _ = _batch()
    codes = {n: m.weight for n, m in iter_adapters(chunks)}
    with torch.no_grad():
        ref = chunks[0](ids, pos, None)
        merge_adapters(chunks)
        assert all(isinstance(m.weight, torch.nn.Parameter) for _, m in iter_adapters(chunks))
        merged = chunks[0](ids, pos, None)
        unmerge_adapters(chunks)
        again = chunks[0](ids, pos, None)
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, ref)
    assert all(isinstance(m.weight, NF4Weight) and m.weight is codes[n] for n, m in iter_adapters(chunks))


def test_rslora_and_dropout(env):
    from megatron_mft.peft import iter_adapters

    _, chunks = _build(env, "lora", rank=16, rslora=True, dropout=0.5)
    m = next(m for _, m in iter_adapters(chunks))
    assert m.scaling == pytest.approx(16.0 / 4.0)
    _set_nonzero_b(chunks)
    ids, pos, _ = _batch()
    with torch.no_grad():
        chunks[0].eval()
        e1, e2 = chunks[0](ids, pos, None), chunks[0](ids, pos, None)
        chunks[0].train()
        t1 = chunks[0](ids, pos, None)
    assert torch.equal(e1, e2) and not torch.allclose(t1, e1)


def test_memory_estimates():
    from megatron_mft.config import PRESETS
    from megatron_mft.peft import estimate_memory, lora_params

    a34, a70 = PRESETS["codellama-34b"], PRESETS["llama2-70b"]
    kw = dict(rank=64, seq_length=4096, micro_batch=1, recompute="full")
    q70 = estimate_memory(a70, method="qlora", **kw)
    l70 = estimate_memory(a70, method="lora", **kw)
    q34 = estimate_memory(a34, method="qlora", **kw)
    assert q70.total < 80e9 and q34.total < 80e9 and l70.total > 80e9
    # hand check: 70B base at TP=1: targeted linears in NF4, the rest (embed/out/norms) bf16
    h, f, kv, L, V = 8192, 28672, 1024, 80, 32000
    tgt = h * (h + 2 * kv) + h * h + h * 2 * f + f * h
    expect = L * (tgt * (0.5 + 1 / 64 + 4 / 16384) + 2 * h * 2) + (2 * V * h + h) * 2
    assert q70.base_weights == pytest.approx(expect)
    n = lora_params(a70, 64, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    assert n == L * 64 * ((h + h + 2 * kv) + 2 * h + (h + 2 * f) + (f + h))
    assert q70.optimizer == pytest.approx(12 * n) and q70.grads == pytest.approx(4 * n)
    # TP=2: the split factors halve, the replicated ones do not
    q70t = estimate_memory(a70, method="qlora", tp=2, **kw)
    assert q70.adapters / 2 < q70t.adapters < q70.adapters


def test_memory_report_and_peak_line(env):
    from megatron_mft.config import RunConfig

    plan, chunks = _build(env, "qlora")
    run = RunConfig()
    run.model = _model_cfg()
    report = plan.memory_report(run.model.arch(), run)
    lines = report.splitlines()
    assert lines[0] == plan.trainable_line() and "NF4" in lines[0]
    assert "hand count 4 layers x r=8" in lines[1] and lines[1].endswith("= 62,464")
    assert "expected memory per GPU (tp=1 pp=1 dp=1" in lines[2] and "optimizer" in lines[2]
    assert "NF4 base" in lines[3]
    assert "peak memory (CPU process, ru_maxrss)" in plan.peak_memory_line()


def test_full_recompute_gives_same_adapter_grads(env):
    """Adapters inside megatron's full-layer recompute: same gradients as without recompute."""
    from megatron_mft.config import ModelConfig, ParallelConfig, PeftConfig
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan, iter_adapters

    ids, pos, labels = _batch()
    grads = []
    for recompute in ("none", "full"):
        mc = ModelConfig(preset="tiny", precision="fp32", recompute=recompute)
        plan = PeftPlan(PeftConfig(method="qlora", rank=8), env, seed=SEED)
        torch.manual_seed(SEED)
        chunks = build_model_chunks(mc, ParallelConfig(), env, layer=plan.layer_spec(mc))
        plan.prepare(chunks)
        _set_nonzero_b(chunks)
        chunks[0](ids, pos, None, labels=labels).sum().backward()
        grads.append({n: m.lora_A.weight.grad.clone() for n, m in iter_adapters(chunks)})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)
