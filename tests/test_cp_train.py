"""Context parallelism through the CLI: CP=2 reproduces the single-process run's per-step loss
and per-task losses (fp32, relative 1e-5) on the same weights, for packed rows (THD, each sample
padded to a multiple of 2 x cp) and dynamic padding (one sample per row), with the loss mode that
needs per-sample statistics (task-sample)."""

import pytest

from train_helpers import run_train, train_losses

STEPS = 3


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, train_overrides):
    root = tmp_path_factory.mktemp("cp")
    cache = {}

    def get(batching: str, peft: tuple = ()):
        key = batching + "".join(peft).replace("=", "").replace(".", "")
        if key not in cache:
            common = train_overrides + [f"train.steps={STEPS}", f"data.batching={batching}", "loss.mode=task-sample",
                                        *peft]
            run_train(common + [f"output_dir={root / ('single_' + key)}"])
            cache[key] = (common, train_losses(root / ("single_" + key)))
        return root, cache[key]

    return get


def _assert_same(ref: dict, got: dict):
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, r in ref.items():
        g = got[step]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), (step, g["loss"], r["loss"])
        for k, v in r.items():
            if k.startswith("task_loss/") and v is not None:
                assert g[k] == pytest.approx(v, rel=1e-5), (step, k)
    assert ref[STEPS]["loss"] < ref[1]["loss"]  # training moved the weights


@pytest.mark.slow
@pytest.mark.parametrize("batching, layout, nproc", [
    ("packed", ["parallel.cp=2"], 2),
    ("dynamic", ["parallel.cp=2"], 2),
    ("packed", ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"], 4),
    ("dynamic", ["parallel.cp=2", "parallel.pp=2"], 4),
], ids=["packed-cp2", "dynamic-cp2", "packed-cp2xtp2-sp", "dynamic-cp2xpp2"])
def test_context_parallel_matches_single_process(baselines, batching, layout, nproc):
    root, (common, ref) = baselines(batching)
    out = root / (batching + "_" + "_".join(layout).replace("=", "").replace(".", "") + f"_n{nproc}")
    run_train(common + layout + [f"output_dir={out}"], nproc=nproc)
    _assert_same(ref, train_losses(out))


@pytest.mark.slow
def test_context_parallel_with_lora_matches_single_process(baselines):
    root, (common, ref) = baselines("packed", ("peft.method=lora", "peft.rank=4", "train.warmup_steps=1"))
    out = root / "packed_lora_cp2"
    run_train(common + ["parallel.cp=2", f"output_dir={out}"], nproc=2)
    _assert_same(ref, train_losses(out))
