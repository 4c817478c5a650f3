"""MoE training through the CLI: a tiny Qwen3-MoE (8 experts, top-4, QK-norm) from a Hugging Face
folder (``model.hf_init``) on the demo data with both router losses on. Steps run and update;
metrics.jsonl carries ``router_aux_loss``, ``router_z_loss`` and the per-expert load; the task
CE (``task_loss/*``) is unchanged by the router coefficients (they act outside the task
weighting); EP=2 gives the single-process losses and router losses step for step."""

from __future__ import annotations

import pytest

from test_moe_fixtures import moe_cli_overrides
from train_helpers import run_many, run_train, train_losses

STEPS = 3
ROUTER = ["model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001"]
SAVE = ["train.save_interval=1"]  # checkpoints of the uninterrupted runs: the resume test starts from step 1
STEP1 = "checkpoints/step_0000001"


@pytest.fixture(scope="module")
def lora_overrides(tmp_path_factory, demo_data):
    """LoRA (per-expert adapters, the shared expert's, attention's) on a tiny Qwen2-MoE, 2 steps:
    the CLI side of test_moe_peft, run in this module's launches."""
    root = tmp_path_factory.mktemp("moe_lora_train")
    return moe_cli_overrides("qwen2_moe", root, demo_data, seed=6, steps=2) + [
        "peft.method=lora", "peft.rank=4", "peft.alpha=8", "train.lr=0.02", "model.moe_aux_loss_coeff=0.01"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, demo_data, lora_overrides):
    """The single-process runs, in one process (tests/train_many.py): the EP=1 reference with
    both router losses (its checkpoints: the resume test's EP=1 side), step 1 without them, and
    the LoRA run at EP=1."""
    root = tmp_path_factory.mktemp("moe_train")
    overrides = moe_cli_overrides("qwen3_moe", root, demo_data, seed=5, steps=STEPS)
    run_many({"ep1": overrides + ROUTER + SAVE + [f"output_dir={root / 'ep1'}"],
              "no_router": overrides + [f"output_dir={root / 'no_router'}", "train.steps=1"],
              "lora_ep1": lora_overrides + [f"output_dir={root / 'lora_ep1'}"]}, root)
    return overrides, train_losses(root / "ep1"), root


@pytest.fixture(scope="module")
def moe_layouts(moe_run, lora_overrides):
    """Every 2-process run, in one torchrun: EP=2 (its checkpoints: the resume test's EP=2 side),
    TP=2 + SP with the experts split over TP (etp=2) or whole on every TP rank (etp=1, each rank
    routing its sequence shard), CP=2 x EP=2 (1 step), the EP=1 run's step-1 checkpoint resumed
    at EP=2, and the LoRA run at EP=2. name -> output_dir."""
    overrides, _, root = moe_run
    base = overrides + ROUTER
    runs = {
        "ep2": base + SAVE + ["parallel.ep=2"],
        "tp2_etp2": base + ["parallel.tp=2", "parallel.sp=true", "parallel.etp=2"],
        "tp2_etp1": base + ["parallel.tp=2", "parallel.sp=true", "parallel.etp=1"],
        "cp2_ep2": base + ["parallel.cp=2", "parallel.ep=2", "train.steps=1"],
        "ep1_then_ep2": base + ["parallel.ep=2", f"train.resume_from={root / 'ep1' / STEP1}"],
        "lora_ep2": lora_overrides + ["parallel.ep=2"],
    }
    spec = root / "layouts"
    spec.mkdir()
    run_many({name: argv + [f"output_dir={root / name}"] for name, argv in runs.items()}, spec, nproc=2)
    return {name: root / name for name in runs}


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
    _, with_router, root = moe_run
    plain = train_losses(root / "no_router")[1]
    assert "router_aux_loss" not in plain and "expert_load" in plain
    assert plain["loss"] == pytest.approx(with_router[1]["loss"], rel=1e-6)
    assert plain["expert_load"] == with_router[1]["expert_load"]


@pytest.mark.slow
def test_ep2_equals_ep1(moe_run, moe_layouts):
    _, single, _ = moe_run
    ep2 = train_losses(moe_layouts["ep2"])
    for step in range(1, STEPS + 1):
        for key in ("loss", "router_aux_loss", "router_z_loss"):
            assert abs(ep2[step][key] - single[step][key]) <= 1e-5 * abs(single[step][key]), (step, key)
        assert ep2[step]["expert_load"] == single[step]["expert_load"], step


@pytest.mark.slow
@pytest.mark.parametrize("etp", [2, 1])
def test_tp2_sp_with_expert_tensor_parallelism_equals_ep1(moe_run, moe_layouts, etp):
    """TP=2 + SP with the experts' MLPs split over TP too (``parallel.etp=2``): losses, grad norms
    and expert load equal the single process, and so do the router losses, whose per-rank parts
    under sequence parallelism (each TP rank routes its sequence shard) are combined as megatron
    defines them: the load-balancing loss summed over the TP ranks, the z-loss averaged."""
    _, single, _ = moe_run
    got = train_losses(moe_layouts[f"tp2_etp{etp}"])  # etp=1: whole experts on every TP rank
    for step in range(1, STEPS + 1):
        for key in ("loss", "router_aux_loss", "router_z_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(single[step][key], rel=1e-5), (step, key)
        assert got[step]["expert_load"] == single[step]["expert_load"], step


@pytest.mark.slow
def test_cp2_with_ep2_equals_ep1(moe_run, moe_layouts):
    """Context parallelism with expert parallelism on 2 processes: CP=2 x EP=2 (the expert-parallel
    group spans the two CP ranks, each routing its sequence chunks). Step 1 runs on identical
    weights: the objective and every task CE equal the single process. The router losses are not
    compared: megatron routes every token, padding included, and CP pads each packed sample to a
    multiple of 2 x cp, so the routed token sets differ by that padding (docs/long-context.md)."""
    _, single, _ = moe_run
    got = train_losses(moe_layouts["cp2_ep2"])[1]
    assert got["loss"] == pytest.approx(single[1]["loss"], rel=1e-5)
    tasks = [k for k, v in single[1].items() if k.startswith("task_loss/") and v is not None]
    assert tasks
    for key in tasks:
        assert got[key] == pytest.approx(single[1][key], rel=1e-5), key
    assert got["cp_padding_tokens"] > 0 and single[1]["cp_padding_tokens"] == 0


@pytest.mark.slow
def test_checkpoints_resume_across_expert_parallel_sizes(moe_run, moe_layouts):
    """Step 1's checkpoint of the EP=2 run resumes at EP=1 (one process), and the EP=1 run's at
    EP=2: the expert weights and their Adam moments reshard (one layout with an expert axis,
    whatever optimizer megatron groups them in) and steps 2-3 equal the uninterrupted run. Step 3
    depends on the restored moments: a fresh Adam state gives another update at step 2."""
    overrides, single, root = moe_run
    ep2_then_ep1 = root / "ep2_then_ep1"  # ep1_then_ep2: a run of moe_layouts' torchrun
    run_train(overrides + ROUTER + [f"output_dir={ep2_then_ep1}", f"train.resume_from={moe_layouts['ep2'] / STEP1}"])
    for name, out in (("ep2_then_ep1", ep2_then_ep1), ("ep1_then_ep2", moe_layouts["ep1_then_ep2"])):
        got = train_losses(out)
        assert sorted(got) == [2, 3], (name, sorted(got))
        for step in (2, 3):
            for key in ("loss", "router_aux_loss", "router_z_loss", "grad_norm"):
                assert got[step][key] == pytest.approx(single[step][key], rel=1e-5), (name, step, key)
            assert got[step]["expert_load"] == single[step]["expert_load"], (name, step)


@pytest.mark.slow
def test_lora_ep2_equals_ep1(moe_run, moe_layouts):
    """LoRA training through the CLI at EP=2 equals EP=1 step for step (loss and router loss,
    1e-5; expert load exact); step 2 runs on trained, non-zero adapters."""
    _, _, root = moe_run
    a, b = train_losses(root / "lora_ep1"), train_losses(moe_layouts["lora_ep2"])
    # no z-loss coefficient here: none reported, though earlier runs of the same processes had one
    assert all("router_z_loss" not in rec and "router_aux_loss" in rec for rec in (*a.values(), *b.values()))
    assert sorted(a) == sorted(b) == [1, 2]
    assert a[2]["loss"] != a[1]["loss"]  # step 2 runs on trained (non-zero) adapters
    for step in a:
        for key in ("loss", "router_aux_loss"):
            assert abs(b[step][key] - a[step][key]) <= 1e-5 * abs(a[step][key]), (step, key, a[step], b[step])
        assert b[step]["expert_load"] == a[step]["expert_load"], step


def test_an_old_chained_optimizer_checkpoint_is_recognised():
    """Checkpoints saved at EP > 1 before the layout-free optimizer format hold megatron's chained
    optimizer state (sub-optimizers 0, 1): the load stops with a message naming train.init_checkpoint
    (checked by hand on a checkpoint written by the previous code) instead of a list of missing keys."""
    from megatron_mft.checkpoint.optimizer_state import FORMAT, is_chained_legacy

    assert is_chained_legacy({0: {"optimizer": {}}, 1: {"optimizer": {}}})
    assert not is_chained_legacy({"format": FORMAT, "step": 3})  # this version's
    assert not is_chained_legacy({"optimizer": {"param_groups": []}, "param_state_sharding_type": "x"})  # old dense
    assert not is_chained_legacy(None)
