"""MoE training through the CLI: a tiny Qwen3-MoE (8 experts, top-4, QK-norm) from a Hugging Face
folder (``model.hf_init``) on the demo data with both router losses on. Steps run and update;
metrics.jsonl carries ``router_aux_loss``, ``router_z_loss`` and the per-expert load; the task
CE (``task_loss/*``) is unchanged by the router coefficients (they act outside the task
weighting); EP=2 gives the single-process losses and router losses step for step."""

from __future__ import annotations

import pytest

from test_moe_fixtures import make_moe_model
from train_helpers import run_train, train_losses

STEPS = 3
ROUTER = ["model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, demo_data):
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, model_section, read_hf_config

    root = tmp_path_factory.mktemp("moe_train")
    hf = make_moe_model("qwen3_moe", root / "hf", seed=5, vocab_size=2048)
    model = model_section(model_config_from_hf(read_hf_config(hf)))
    overrides = [f"model.{k}={v}" for k, v in model.items()] + [
        f"model.hf_init={hf}", "data.source=offline", f"data.path={demo_data}", "data.seq_length=512",
        f"train.steps={STEPS}", "train.eval_interval=0", "train.save_interval=0", "train.global_batch_size=4"]
    out = root / "ep1"
    run_train(overrides + ROUTER + [f"output_dir={out}"])
    return overrides, train_losses(out), root


def test_moe_trains_and_logs_router_losses_and_expert_load(moe_run):
    _, losses, _ = moe_run
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(0 < losses[s]["loss"] < 30 and losses[s]["grad_norm"] is not None for s in losses)
    for rec in losses.values():
        # top-1 of a uniform router over 8 experts gives aux ~ 1; a collapsed router ~ 8 (top_k x E / k)
        assert 0.5 < rec["router_aux_loss"] < 8.0 and rec["router_z_loss"] > 0, rec
        load = rec["expert_load"]
        assert len(load) == 2 and all(len(row) == 8 for row in load)
        # each token of the global batch goes to exactly top_k = 4 experts in every layer
        assert len({sum(row) for row in load}) == 1 and sum(load[0]) % 4 == 0 and sum(load[0]) > 0


def test_router_coefficients_stay_outside_the_task_losses(moe_run):
    """Step 1 runs on identical weights: the reported objective and task CE do not include the
    router losses (the router gradient moves the weights only from step 2 on)."""
    overrides, with_router, root = moe_run
    out = root / "no_router"
    run_train(overrides + [f"output_dir={out}", "train.steps=1"])
    plain = train_losses(out)[1]
    assert "router_aux_loss" not in plain and "expert_load" in plain
    assert plain["loss"] == pytest.approx(with_router[1]["loss"], rel=1e-6)
    assert plain["expert_load"] == with_router[1]["expert_load"]


@pytest.mark.slow
def test_ep2_equals_ep1(moe_run):
    overrides, single, root = moe_run
    out = root / "ep2"
    run_train(overrides + ROUTER + ["parallel.ep=2", f"output_dir={out}"], nproc=2)
    ep2 = train_losses(out)
    for step in range(1, STEPS + 1):
        for key in ("loss", "router_aux_loss", "router_z_loss"):
            assert abs(ep2[step][key] - single[step][key]) <= 1e-5 * abs(single[step][key]), (step, key)
        assert ep2[step]["expert_load"] == single[step]["expert_load"], step


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known bug, not fixed yet: the EP=2 distributed-optimizer state does not "
                   "load at EP=1 (megatron apply_factory_merges: dict keys [0, 1] vs ['param_state'])")
def test_ep2_checkpoint_resumes_at_ep1(moe_run):
    """Stop after step 1 at EP=2, resume at EP=1: the expert weights and their optimizer state
    reshard (one checkpoint layout with an expert axis) and the run continues as uninterrupted."""
    overrides, single, root = moe_run
    out = root / "ep2_then_ep1"
    run_train(overrides + ROUTER + ["parallel.ep=2", f"output_dir={out}", "train.exit_duration_minutes=1e-6"], nproc=2)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    run_train(overrides + ROUTER + [f"output_dir={out}"])
    got = train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "router_aux_loss"):
            assert got[step][key] == pytest.approx(single[step][key], rel=1e-5), (step, key)
