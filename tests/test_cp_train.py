"""Context parallelism through the CLI: CP runs reproduce the single-process run's per-step loss
and per-task losses (fp32, relative 1e-5) on the same weights, for packed rows (THD, each sample
padded to a multiple of 2 x cp) and dynamic padding (one sample per row), with the loss mode that
needs per-sample statistics (task-sample); checkpoints reshard across CP sizes (CP=2 x PP=2 ->
CP=1 and CP=1 -> CP=2 resume with the uninterrupted run's losses)."""

import pytest

from train_helpers import read_metrics, run_many, train_losses

STEPS = 3
LORA = ("peft.method=lora", "peft.rank=4", "train.warmup_steps=1")
#: run name -> (its baseline, layout overrides, processes); the baselines are the single-process runs
LAYOUTS = {
    "packed_cp2xtp2-sp": ("packed", ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"], 4),
    "dynamic_cp2xpp2": ("dynamic", ["parallel.cp=2", "parallel.pp=2"], 4),
    # stops after step 1 (its checkpoint is resumed at CP=1 below)
    "packed_cp2pp2_then_cp1": ("packed", ["parallel.cp=2", "parallel.pp=2", "train.exit_duration_minutes=1e-6"], 4),
    "dynamic_cp1_then_cp2": ("dynamic", ["parallel.cp=2"], 2),  # resumes the baseline's step 1
    "packed_lora_cp2": ("packed_lora", ["parallel.cp=2"], 2),
}


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory, train_overrides):
    """Every run of this module, one launch per process count (tests/train_many.py): the
    single-process baselines (saving every step, so a CP run resumes from step 1), the CP layouts,
    then the CP=2 x PP=2 run's step-1 checkpoint resumed at CP=1. Returns (root, baseline name ->
    (its overrides, its losses), what the CP=2 x PP=2 run left before its resume)."""
    root = tmp_path_factory.mktemp("cp")
    common = {b: train_overrides + [f"train.steps={STEPS}", f"data.batching={b.split('_')[0]}",
                                    "loss.mode=task-sample", *(LORA if b.endswith("lora") else ())]
              for b in ("packed", "dynamic", "packed_lora")}
    run_many({b: argv + [f"output_dir={root / ('single_' + b)}", "train.save_interval=1"]
              for b, argv in common.items()}, _spec(root, "single"))
    resume = {"dynamic_cp1_then_cp2": [f"train.resume_from={root / 'single_dynamic' / 'checkpoints' / 'step_0000001'}"]}
    for nproc in (4, 2):
        run_many({name: common[b] + layout + resume.get(name, []) + [f"output_dir={root / name}"]
                  for name, (b, layout, n) in LAYOUTS.items() if n == nproc}, _spec(root, f"n{nproc}"), nproc=nproc)
    stopped = {"metrics": read_metrics(root / "packed_cp2pp2_then_cp1"),
               "latest": (root / "packed_cp2pp2_then_cp1" / "checkpoints" / "latest").read_text().strip()}
    run_many({"resume": common["packed"] + [f"output_dir={root / 'packed_cp2pp2_then_cp1'}"]}, _spec(root, "resume"))
    return root, {b: (argv, train_losses(root / ("single_" + b))) for b, argv in common.items()}, stopped


def _spec(root, name):
    (root / f"spec_{name}").mkdir()
    return root / f"spec_{name}"


def _assert_same(ref: dict, got: dict, first: int = 1):
    """Steps ``first``..STEPS of ``got`` equal the reference run's."""
    assert sorted(got) == list(range(first, STEPS + 1))
    for step in got:
        r, g = ref[step], got[step]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), (step, g["loss"], r["loss"])
        for k, v in r.items():
            if k.startswith("task_loss/") and v is not None:
                assert g[k] == pytest.approx(v, rel=1e-5), (step, k)
    assert ref[STEPS]["loss"] < ref[1]["loss"]  # training moved the weights


@pytest.mark.slow
@pytest.mark.parametrize("name", ["packed_cp2xtp2-sp", "dynamic_cp2xpp2"])
def test_context_parallel_matches_single_process(cp_runs, name):
    root, baselines = cp_runs[:2]
    batching = LAYOUTS[name][0]
    common, ref = baselines[batching]
    got = train_losses(root / name)
    _assert_same(ref, got)
    # the CP padding of packed samples is reported per step (metrics.jsonl cp_padding_tokens)
    expected = _cp_padding_per_step(common, cp=2) if batching == "packed" else [0] * STEPS
    assert [got[s]["cp_padding_tokens"] for s in range(1, STEPS + 1)] == expected
    assert all(ref[s]["cp_padding_tokens"] == 0 for s in ref)  # CP=1 pads nothing
    if batching == "packed":
        assert sum(expected) > 0


def _cp_padding_per_step(common: list[str], cp: int) -> list[int]:
    """Tokens needed per step to round every packed sample up to a multiple of 2 x cp, counted
    from the unpadded (CP=1) micro batches of each global batch (DP=1: all rows)."""
    import numpy as np

    from megatron_mft.config.run import load_config
    from megatron_mft.data import MFTData
    from train_helpers import CONFIG

    cfg = load_config(CONFIG, common)
    t = cfg.train
    data = MFTData(cfg.data, seed=cfg.seed, micro_batch_size=t.micro_batch_size,
                   global_batch_size=t.global_batch_size, dp_rank=0, dp_size=1)
    per_step = []
    for step in range(STEPS):
        pad = 0
        for mb in data.train_micro_batches(step * t.global_batch_size):
            for row in np.asarray(mb["sample_ids"]):
                lengths = np.bincount(row[row >= 0])
                lengths = lengths[lengths > 0]
                pad += int(((-lengths) % (2 * cp)).sum())
        per_step.append(pad)
    return per_step


@pytest.mark.slow
def test_packed_cp2_pp2_checkpoint_resumes_at_cp1(cp_runs):
    """Packed rows at CP=2 x PP=2 (4 ranks) equal the single-process step 1; its checkpoint
    (model, distributed-optimizer state sharded over DP x CP, data position) resumes in one
    process with the uninterrupted run's steps 2..3."""
    root, baselines, stopped = cp_runs
    out = root / "packed_cp2pp2_then_cp1"
    assert [r["step"] for r in stopped["metrics"]] == [1]  # the CP=2 x PP=2 run stopped after step 1 ...
    assert stopped["latest"] == "step_0000001"
    _assert_same(baselines["packed"][1], train_losses(out))  # ... and steps 2..3 were resumed at CP=1
    assert len(read_metrics(out)) == STEPS


@pytest.mark.slow
def test_cp1_checkpoint_resumes_at_cp2(cp_runs):
    """Dynamic batches: the single-process run's step-1 checkpoint continues at CP=2 with its
    steps 2..3."""
    root, baselines, _ = cp_runs
    _assert_same(baselines["dynamic"][1], train_losses(root / "dynamic_cp1_then_cp2"), first=2)


@pytest.mark.slow
def test_context_parallel_with_lora_matches_single_process(cp_runs):
    root, baselines, _ = cp_runs
    _assert_same(baselines["packed_lora"][1], train_losses(root / "packed_lora_cp2"))


def test_cp_with_ep_layout_rules():
    """CP x EP as megatron lays it out: world % (tp x pp x cp) and world % (etp x ep x pp); on two
    processes CP=2 x EP=2 is valid (the expert-parallel group spans the CP ranks)."""
    from megatron_mft.config.parallel import ParallelConfig

    assert ParallelConfig(cp=2, ep=2).world_problems(2) == []
    assert ParallelConfig(cp=2, ep=2).data_parallel_size(2) == 1
    assert ParallelConfig(cp=2, ep=4).world_problems(2) == [
        "parallel.etp x parallel.ep x parallel.pp = 1 x 4 x 1 needs a multiple of 4 processes; got 2 processes"]
    assert ParallelConfig(cp=2, ep=2, tp=2).world_problems(2) == [
        "parallel.tp x parallel.pp x parallel.cp = 2 x 1 x 2 needs a multiple of 4 processes; got 2 processes"]
