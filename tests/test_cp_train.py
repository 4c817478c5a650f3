"""Context parallelism through the CLI: CP runs reproduce the single-process run's per-step loss
and per-task losses (fp32, relative 1e-5) on the same weights, for packed rows (THD, each sample
padded to a multiple of 2 x cp) and dynamic padding (one sample per row), with the loss mode that
needs per-sample statistics (task-sample); checkpoints reshard across CP sizes (CP=2 x PP=2 ->
CP=1 and CP=1 -> CP=2 resume with the uninterrupted run's losses)."""

import pytest

from train_helpers import read_metrics, run_train, train_losses

STEPS = 3


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, train_overrides):
    """The single-process run of each batching mode; it saves every step, so a CP run can
    resume from its step-1 checkpoint."""
    root = tmp_path_factory.mktemp("cp")
    cache = {}

    def get(batching: str, peft: tuple = ()):
        key = batching + "".join(peft).replace("=", "").replace(".", "")
        if key not in cache:
            common = train_overrides + [f"train.steps={STEPS}", f"data.batching={batching}", "loss.mode=task-sample",
                                        *peft]
            run_train(common + [f"output_dir={root / ('single_' + key)}", "train.save_interval=1"])
            cache[key] = (common, train_losses(root / ("single_" + key)))
        return root, cache[key]

    return get


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
@pytest.mark.parametrize("batching, layout, nproc", [
    ("packed", ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"], 4),
    ("dynamic", ["parallel.cp=2", "parallel.pp=2"], 4),
], ids=["packed-cp2xtp2-sp", "dynamic-cp2xpp2"])
def test_context_parallel_matches_single_process(baselines, batching, layout, nproc):
    root, (common, ref) = baselines(batching)
    out = root / (batching + "_" + "_".join(layout).replace("=", "").replace(".", "") + f"_n{nproc}")
    run_train(common + layout + [f"output_dir={out}"], nproc=nproc)
    _assert_same(ref, train_losses(out))


@pytest.mark.slow
def test_packed_cp2_pp2_checkpoint_resumes_at_cp1(baselines):
    """Packed rows at CP=2 x PP=2 (4 ranks) equal the single-process step 1; its checkpoint
    (model, distributed-optimizer state sharded over DP x CP, data position) resumes in one
    process with the uninterrupted run's steps 2..3."""
    root, (common, ref) = baselines("packed")
    out = root / "packed_cp2pp2_then_cp1"
    run_train(common + ["parallel.cp=2", "parallel.pp=2", f"output_dir={out}", "train.exit_duration_minutes=1e-6"],
              nproc=4)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert [r["step"] for r in read_metrics(out)] == [1]
    run_train(common + [f"output_dir={out}"])
    _assert_same(ref, train_losses(out))  # step 1 from CP=2 x PP=2, steps 2..3 resumed at CP=1
    assert len(read_metrics(out)) == STEPS


@pytest.mark.slow
def test_cp1_checkpoint_resumes_at_cp2(baselines):
    """Dynamic batches: the single-process run's step-1 checkpoint continues at CP=2 with its
    steps 2..3."""
    root, (common, ref) = baselines("dynamic")
    out = root / "dynamic_cp1_then_cp2"
    run_train(common + ["parallel.cp=2", f"output_dir={out}",
                        f"train.resume_from={root / 'single_dynamic' / 'checkpoints' / 'step_0000001'}"], nproc=2)
    _assert_same(ref, train_losses(out), first=2)


@pytest.mark.slow
def test_context_parallel_with_lora_matches_single_process(baselines):
    root, (common, ref) = baselines("packed", ("peft.method=lora", "peft.rank=4", "train.warmup_steps=1"))
    out = root / "packed_lora_cp2"
    run_train(common + ["parallel.cp=2", f"output_dir={out}"], nproc=2)
    _assert_same(ref, train_losses(out))
