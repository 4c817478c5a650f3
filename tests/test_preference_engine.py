"""The preference stages through the real training CLI on the demo pairs.

Two launches, side by side (``tests/train_many.py``: each run is the CLI's own ``main``, one
after the other in one process, so start-up is paid once per launch):

- one process: DPO with LoRA (reference = adapters disabled; step-1 loss exactly log 2), the same
  run with 2 rows per micro batch, one pair per row packed against dynamic batching, ORPO,
  full-FT DPO with the stored pre-pass reference (computed, then read back on a resume, refused
  for another starting checkpoint) and with a frozen reference copy (equal to the stored one;
  refused with LoRA);
- torchrun, 2 processes: TP=2 and PP=2 (DPO-LoRA), DP=2 (ORPO), PP=2 with the frozen reference,
  each equal to its single-process run.
"""

from __future__ import annotations

import math
import shutil

import pytest

from train_helpers import ROOT, read_metrics, start_many, train_losses, wait_many

#: end-to-end CLI runs (minutes on 2 shared cores): all slow, they still run in CI
pytestmark = pytest.mark.slow
CONFIG = ROOT / "examples" / "tiny_cpu_dpo.yaml"
TOKENIZER = ROOT / "examples/demo_data/tokenizer/demo_sp2048.model"
STEPS = 3
#: the raw pairs tokenised at start-up (the example config reads examples/demo_dpo.sh's preprocessed folder)
ONLINE = ["data.source=online", f"data.tokenizer={TOKENIZER}", "data.mode=preference", "data.overlong=drop"]
ORPO = ["train.stage=orpo", "loss.mode=task-token", "loss.preference.lambda=0.5"]
FULL_FT = ["data.source=offline", "peft.method=none", "train.lr=1e-4", "train.min_lr=1e-4"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """The first 6 demo pairs of each task (online tokenisation at start-up is then instant)."""
    root = tmp_path_factory.mktemp("pairs")
    src = ROOT / "examples/demo_data/preference"
    for task in sorted(p.name for p in src.iterdir() if p.is_dir()):
        (root / task).mkdir()
        for split, n in (("train", 6), ("val", 1)):
            lines = (src / task / f"{split}.jsonl").read_text().splitlines()[:n]
            (root / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def pairs_offline(pairs_dir, tmp_path_factory):
    """The same pairs through ``preprocess_mft.py --mode preference`` (the command's main, in process)."""
    from megatron_mft.data.preprocess import main

    out = tmp_path_factory.mktemp("pairs_offline") / "data"
    rc = main(["--data-dir", str(pairs_dir), "--tokenizer-model", str(TOKENIZER), "--seq-length", "512",
               "--packing", "best-fit", "--overlong", "drop", "--mode", "preference", "--output-dir", str(out),
               "--no-progress"])
    assert rc == 0
    return out


def _overrides(data, init, out, *extra):
    online = ONLINE if "data.source=offline" not in extra else []
    return ["--config", str(CONFIG), f"data.path={data}", *online, "data.seq_length=512",
            f"train.init_checkpoint={init}", f"train.steps={STEPS}", "train.global_batch_size=4",
            "train.micro_batch_size=1", "train.warmup_steps=0", "train.save_interval=0", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def launches(pairs_dir, pairs_offline, tiny_init, tmp_path_factory):
    """Both launches, side by side (neither reads the other's output; on 2 cores the
    single-process launch leaves room for the torchrun's waits): name -> (output_dir, stdout,
    stderr) of every run. One process: every single-process run; one torchrun: every 2-process
    layout."""
    single, layouts = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("layouts")
    other = single / "other_init"  # another starting checkpoint: one byte more in a weight file
    shutil.copytree(tiny_init, other)
    with next(p for p in sorted(other.rglob("*")) if p.is_file() and p.stat().st_size > 1000).open("ab") as f:
        f.write(b"\0")
    full = _overrides(pairs_offline, tiny_init, single / "full", *FULL_FT)
    single_runs = {
        "dpo": _overrides(pairs_dir, tiny_init, single / "dpo"),
        "dpo_mbs2": _overrides(pairs_dir, tiny_init, single / "dpo_mbs2", "train.micro_batch_size=2"),
        "orpo": _overrides(pairs_dir, tiny_init, single / "orpo", *ORPO),
        # the finished run started again with other settings: nothing trained, nothing re-saved
        "orpo_again": _overrides(pairs_dir, tiny_init, single / "orpo", *ORPO, "loss.preference.lambda=0.7",
                                 "train.lr=1.0"),
        # one pair per row: packed (THD) against dynamic batching (a pair = two SBHD rows, padded)
        "dpo_none": _overrides(pairs_dir, tiny_init, single / "dpo_none", "data.packing=none"),
        "dpo_dynamic": _overrides(pairs_dir, tiny_init, single / "dpo_dynamic", "data.batching=dynamic",
                                  "train.micro_batch_size=2"),
        "full": full + ["train.steps=2", "train.save_interval=2"],
        "full_resume": full,  # step 2 -> 3 with the stored reference
        # a different starting checkpoint has no stored reference, and a resume cannot make one
        "full_other": {"argv": [f"train.init_checkpoint={other}" if a.startswith("train.init_checkpoint=") else a
                                for a in full] + ["train.steps=4"], "rc": 2},
        "frozen": _overrides(pairs_offline, tiny_init, single / "frozen", *FULL_FT, "loss.preference.reference=frozen"),
        # LoRA's reference is its own adapters-off model: a frozen copy is refused before the model is built
        "frozen_lora": {"rc": 2, "argv": _overrides(pairs_dir, tiny_init, single / "frozen_lora",
                                                    "loss.preference.reference=frozen")},
    }
    layout_runs = {
        "dpo_tp2": _overrides(pairs_dir, tiny_init, layouts / "dpo_tp2", "parallel.tp=2"),
        "dpo_pp2": _overrides(pairs_dir, tiny_init, layouts / "dpo_pp2", "parallel.pp=2"),
        "orpo_dp2": _overrides(pairs_dir, tiny_init, layouts / "orpo_dp2", *ORPO),
        "frozen_pp2": _overrides(pairs_offline, tiny_init, layouts / "frozen_pp2", *FULL_FT, "parallel.pp=2",
                                 "loss.preference.reference=frozen"),
    }
    started = [start_many(single_runs, single, nproc=1), start_many(layout_runs, layouts, nproc=2)]
    try:
        logs = wait_many(started[0]) | wait_many(started[1])
    finally:
        for proc, _ in started:  # the other launch, if one failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    folders = {name: single / name.replace("_resume", "").replace("_other", "").replace("_again", "")
               for name in single_runs}
    folders |= {name: layouts / name for name in layout_runs}
    return {name: (folders[name], *logs[name]) for name in folders}


@pytest.fixture(scope="module")
def single(launches):
    """Every single-process run: name -> (output_dir, stdout, stderr)."""
    return launches


@pytest.fixture(scope="module")
def layouts(launches):
    """Every 2-process layout: name -> output_dir."""
    return {name: launches[name][0] for name in ("dpo_tp2", "dpo_pp2", "orpo_dp2", "frozen_pp2")}


KEYS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm")


def _close(a, b, rel=1e-5):
    """Rewards are beta x differences of ~1e3-sized fp32 log-prob sums: compared at 1e-7 of those."""
    for step in range(1, STEPS + 1):
        for k in KEYS:
            tol = 2e-5 if k.startswith("rewards/") else 1e-6
            assert a[step][k] == pytest.approx(b[step][k], rel=rel, abs=tol), (step, k, a[step][k], b[step][k])


def test_dpo_lora_starts_at_log2(single):
    dpo = train_losses(single["dpo"][0])
    first = dpo[1]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-7) and first["rewards/chosen"] == 0.0
    assert dpo[STEPS]["rewards/margin"] != 0.0  # the adapters moved the policy off its reference
    assert all(f"task_rewards_accuracy/{t}" in r or f"task_pairs/{t}" not in r
               for r in dpo.values() for t in ("doctest", "docstring"))


def test_dpo_lora_micro_batch_split_invariant(single):
    _close(train_losses(single["dpo_mbs2"][0]), train_losses(single["dpo"][0]), rel=1e-6)


def test_dpo_dynamic_batching_equals_packed_pairs(single):
    """data.batching=dynamic (2 pairs = 4 rows per micro batch, padded to the longest response) gives
    the losses of packed rows of one pair each: pairs stay together and the loss is exact."""
    _close(train_losses(single["dpo_dynamic"][0]), train_losses(single["dpo_none"][0]))


@pytest.mark.parametrize("name, reference", [("dpo_tp2", "dpo"), ("dpo_pp2", "dpo"), ("orpo_dp2", "orpo"),
                                             ("frozen_pp2", "full")])
def test_layouts_equal_single_process(name, reference, single, layouts):
    """TP=2 / PP=2 DPO-LoRA, DP=2 ORPO, and PP=2 with the frozen reference (sharded as the policy)
    against the single-process runs (the full-FT one: the stored reference, steps 1-2 then resumed)."""
    _close(train_losses(layouts[name]), train_losses(single[reference][0]))


def test_orpo_objective_is_nll_plus_odds_ratio_term(single):
    one = train_losses(single["orpo"][0])
    assert one[1]["nll_chosen"] > 0 and one[1]["loss"] > one[1]["nll_chosen"]  # NLL + lambda * odds-ratio term


def test_a_finished_run_started_again_keeps_its_checkpoint_and_config(single):
    """Started again at its last step with lambda 0.7 and lr 1.0, the ORPO run trains nothing and
    re-saves nothing: its checkpoint and config.yaml still describe the run that trained it (the
    re-save recorded the new settings for weights trained with the old ones)."""
    import json

    import yaml

    out, stdout, _ = single["orpo_again"]
    said = " ".join(stdout.split())
    assert f"checkpoints/step_{STEPS:07d} is at step {STEPS}, the last of this run's {STEPS}" in said, stdout[-2000:]
    assert "raise train.steps" in said and "saved checkpoint" not in stdout
    assert "loss.preference.lambda 0.5 -> 0.7" in stdout  # the YAML key, not the field lambda_
    saved = json.loads((out / f"checkpoints/step_{STEPS:07d}/run.json").read_text())["config"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    for cfg in (saved, resolved):
        assert cfg["loss"]["preference"]["lambda_"] == 0.5 and cfg["train"]["lr"] != 1.0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, STEPS + 1))


def test_dpo_full_ft_precomputed_reference(single, pairs_offline):
    files = list((pairs_offline / "_reference_logps").glob("*.npz"))
    assert len(files) == 1 and "dpo reference: computed" in single["full"][1]
    rec = train_losses(single["full"][0])
    assert rec[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the pre-pass is the step-1 policy
    assert abs(rec[1]["rewards/chosen"]) < 1e-6 and abs(rec[2]["rewards/margin"]) > 1e-7
    assert "dpo reference: " + str(files[0]) in single["full_resume"][1].replace("\n", " ")
    assert "resumed from" in single["full_resume"][1] and STEPS in rec
    err = single["full_other"][2]
    assert "a resumed run cannot recompute them" in err and "Traceback" not in err, err[-2000:]


def test_dpo_full_ft_frozen_reference_equals_precomputed(single):
    """loss.preference.reference=frozen: a no-grad copy of the starting weights gives the stored
    pre-pass's reference log-probs, so the same steps (the precomputed run: 2 steps, resumed to 3)."""
    frozen, stored = train_losses(single["frozen"][0]), train_losses(single["full"][0])
    assert "dpo reference: a frozen copy of the starting weights" in single["frozen"][1]
    for step in range(1, STEPS + 1):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "grad_norm"):
            assert frozen[step][k] == pytest.approx(stored[step][k], rel=1e-6, abs=1e-6), (step, k)
    assert frozen[1]["loss"] == pytest.approx(math.log(2), abs=1e-6) and frozen[STEPS]["rewards/margin"] != 0.0
    err = single["frozen_lora"][2]
    assert "loss.preference.reference frozen: for full fine-tuning only" in err and "Traceback" not in err, err[-2000:]


# ---------------------------------------------------------------- MoE router losses (in process)
#: a tiny MoE (4 experts top-2, 2 layers) with megatron's load-balancing loss
MOE = ["model.num_layers=2", "model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=96",
       "model.moe_aux_loss_coeff=0.01"]


@pytest.fixture(scope="module")
def moe_engine(tp1_env, pairs_offline):
    """One ORPO-ready MoE engine on the demo pairs (no grad clipping: the gradients are compared),
    its starting weights and router settings as built, and the first global batch (4 micro batches)."""
    import copy

    from megatron_mft.config import load_config
    from megatron_mft.data import MFTData
    from megatron_mft.model import build_model_chunks
    from megatron_mft.model.moe import routers
    from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_mft.training.step import install_grad_finalizer

    cfg = load_config(None, [f"data.path={pairs_offline}", "data.source=offline", "data.seq_length=512",
                             "train.stage=orpo", "loss.mode=task-token", "train.clip_grad=0", *MOE])
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.parallel, tp1_env), cfg)
    install_grad_finalizer(chunks)
    opt = build_optimizer(chunks, cfg)
    sched = build_scheduler(opt, cfg, 100)
    data = MFTData(cfg.data, seed=0, micro_batch_size=1, global_batch_size=4, dp_rank=0, dp_size=1)
    built = [(r, r.calculate_per_token_loss, r.config.moe_aux_loss_coeff) for r in routers(chunks)]
    return cfg, chunks, opt, sched, copy.deepcopy(chunks[0].module.state_dict()), built, data


def _moe_step(engine, stage: str, coeff: float):
    """One step of ``stage`` from the starting weights with router coefficient ``coeff``, the routers
    as a fresh run's (the previous step's scaling undone); returns (metrics, gradient)."""
    import dataclasses

    import torch

    from megatron_mft.config import load_config
    from megatron_mft.model.moe import RouterLoad
    from megatron_mft.training.step import StepContext, train_step

    cfg, chunks, opt, sched, weights, built, data = engine
    chunks[0].module.load_state_dict(weights)
    for r, per_token, _ in built:
        r.calculate_per_token_loss, r.config.moe_aux_loss_coeff = per_token, coeff
    router = RouterLoad(chunks, dataclasses.replace(cfg.model, moe_aux_loss_coeff=coeff), cfg.parallel)
    loss_cfg = load_config(None, ["data.path=/x", f"train.stage={stage}", "loss.mode=task-token"]).loss
    ctx = StepContext(loss_cfg=loss_cfg, task_names=data.task_names, device=torch.device("cpu"), packed=True,
                      stage=stage, router=router, task_weights=torch.ones(len(data.task_names)))
    try:
        out = train_step(chunks, opt, sched, data.train_micro_batches(0), ctx)
    finally:
        for h in router.handles:
            h.remove()
    return out, torch.cat([p.main_grad.flatten() for p in chunks[0].parameters()]).double()


def test_preference_step_adds_router_losses_as_the_sft_step(moe_engine):
    """DPO/ORPO on MoE: the router loss reaches the gradient once per step, coeff x the mean over
    micro batches of the layers' loss (docs/moe.md), as in sft: its gradient (step with the
    coefficient minus without) equals the sft step's on the same micro batches, and the metrics
    carry router_aux_loss / expert_load. Before, megatron's per-token scaling applied unscaled
    (the router part of the gradient x ~tokens per micro batch x micro batches)."""
    orpo, g_orpo = _moe_step(moe_engine, "orpo", 0.01)
    _, g_orpo0 = _moe_step(moe_engine, "orpo", 0.0)
    sft, g_sft = _moe_step(moe_engine, "sft", 0.01)
    _, g_sft0 = _moe_step(moe_engine, "sft", 0.0)
    want, got = g_sft - g_sft0, g_orpo - g_orpo0
    assert want.norm() > 1e-3 * g_sft0.norm()  # the router loss does move the gradient
    assert (got - want).norm() <= 1e-3 * want.norm(), (float(got.norm()), float(want.norm()))
    assert orpo["router_aux_loss"] == pytest.approx(sft["router_aux_loss"], rel=1e-6)
    assert orpo["expert_load"] == sft["expert_load"] and sum(orpo["expert_load"][0]) > 0
