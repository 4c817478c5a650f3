"""Every loss mode through the real engine step: the same global batch split into 1, 2 or 4
micro batches gives the same objective and the same gradient (megatron schedule, DDP, grad
clipping norm), on the demo data with several samples per packed row; for the dense model and
for a mixture-of-experts model (megatron's MoE layer, 4 experts top-2, no token dropping: the
task-aware CE stays exact over the split; router losses off, they are per micro batch by
megatron's definition and stay outside the task weighting)."""

import copy

import pytest
import torch

MODES = [
    ("token", {}), ("sample", {}), ("task-token", {}), ("task-sample", {}),
    ("focal-sample", {"loss.gamma": 2.0}), ("focal-task", {"loss.gamma": 2.0}),
    ("focal-task", {"loss.gamma": 2.0, "loss.focal_task_exact": False}),
    ("task-token", {"loss.task_weights.docstring": 3.0}),
]


#: a tiny MoE on the same graph: each token's routing depends on that token alone (no capacity)
MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=96",
       "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0"]


@pytest.fixture(scope="module", params=["dense", "moe"])
def engine(request, single_process_group, demo_data):
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_mft.training.parallel import init_parallel
    from megatron_mft.training.step import install_grad_finalizer

    env = single_process_group
    cfg = load_config("examples/tiny_cpu.yaml", [f"data.path={demo_data}", "data.source=offline",
                                                 "data.seq_length=512", "model.num_layers=2"]
                      + (MOE if request.param == "moe" else []))
    assert bool(cfg.model.arch().num_experts) == (request.param == "moe")
    init_parallel(cfg.parallel, env, seed=3)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.parallel, env), cfg)
    install_grad_finalizer(chunks)
    opt = build_optimizer(chunks, cfg)
    sched = build_scheduler(opt, cfg, 100)
    weights = copy.deepcopy(chunks[0].module.state_dict())
    # Sharpen the untrained model's predictions: at init every token has p ~ 1/vocab, which
    # makes the focal factors nearly constant and hides any split dependence.
    out_keys = [k for k in weights if "output_layer.weight" in k]
    assert out_keys, list(weights)
    for k in out_keys:
        weights[k] = weights[k] * 20.0
    return cfg, chunks, opt, sched, weights, _spread_batch(cfg), request.param


def _spread_batch(cfg) -> int:
    """Consumed rows of the first global batch (4 rows) in which some task takes loss in both
    halves: only then do the 2- and 1-row splits differ for the split-sensitive modes."""
    from megatron_mft.data import MFTData

    data = MFTData(cfg.data, seed=0, micro_batch_size=1, global_batch_size=4, dp_rank=0, dp_size=1)
    for consumed in range(0, 400, 4):
        rows = [set(b["task_ids"][b["loss_mask"] > 0].tolist()) for b in data.train_micro_batches(consumed)]
        if (rows[0] | rows[1]) & (rows[2] | rows[3]):
            return consumed
    raise AssertionError("no global batch spreads a task over both halves")


def _step(engine, mode, extra, micro_batch_size):
    from megatron_mft.config import load_config
    from megatron_mft.data import MFTData
    from megatron_mft.loss import task_weights_in_force
    from megatron_mft.training.step import StepContext, train_step

    cfg, chunks, opt, sched, weights, consumed, _ = engine
    over = [f"loss.mode={mode}"] + [f"{k}={v}" for k, v in extra.items()]
    loss_cfg = load_config(None, ["data.path=/x"] + over).loss
    chunks[0].module.load_state_dict(weights)
    data = MFTData(cfg.data, seed=0, micro_batch_size=micro_batch_size, global_batch_size=4, dp_rank=0, dp_size=1)
    ctx = StepContext(loss_cfg=loss_cfg, task_names=data.task_names, device=torch.device("cpu"), packed=True)
    ctx.task_weights = task_weights_in_force(loss_cfg, data.task_names)
    out = train_step(chunks, opt, sched, data.train_micro_batches(consumed), ctx)
    return out["loss"], out["grad_norm"]


@pytest.mark.parametrize("mode, extra", MODES, ids=[m + ("-" + "-".join(map(str, e.values())) if e else "")
                                                    for m, e in MODES])
def test_split_invariance(engine, mode, extra):
    approximate = mode == "focal-task" and extra.get("loss.focal_task_exact") is False
    if approximate and engine[-1] == "moe":
        pytest.skip("one-pass focal-task is an approximation, not claimed exact; its split dependence is shown "
                    "on the dense model (on this MoE batch it happens to land within 1e-6)")
    ref = _step(engine, mode, extra, 4)
    for mbs in (2, 1):
        got = _step(engine, mode, extra, mbs)
        if approximate:
            # one-pass focal-task is an approximation that depends on the split (docs/losses.md)
            # ... so it fails the tolerances the exact modes meet below
            exact_looking = got[0] == pytest.approx(ref[0], rel=1e-6) and got[1] == pytest.approx(ref[1], rel=1e-5)
            assert not exact_looking, (mbs, got, ref)
            continue
        assert got[0] == pytest.approx(ref[0], rel=1e-6), (mbs, got, ref)
        assert got[1] == pytest.approx(ref[1], rel=1e-5), (mbs, got, ref)
