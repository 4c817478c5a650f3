"""TP / PP (1F1B and interleaved) / DP / SP give the single-process losses on the same weights.

Each layout runs the real CLI (``torchrun -m megatron_mft.train``) on gloo and must reproduce
the single-process run's per-step loss and per-task losses (fp32, relative 1e-5), for packed
rows (THD attention over cu_seqlens) and for dynamic padding (one sample per row). The packed
reference and the packed TP=2+SP run are the session's (conftest: ``reference_run``,
``tp2_sp_run``), shared with test_engine_resume.
"""

import pytest

from train_helpers import REFERENCE_STEPS as STEPS, run_train, train_losses


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, reference_run):
    """batching -> (root, (overrides, single-process losses)); the dynamic one is run here."""
    root = tmp_path_factory.mktemp("layouts")
    packed, ref = reference_run
    cache = {"packed": (packed, ref)}

    def get(batching: str):
        if batching not in cache:
            common = [o for o in packed if not o.startswith("data.batching=")] + [f"data.batching={batching}"]
            run_train(common + [f"output_dir={root / ('single_' + batching)}"])
            cache[batching] = (common, train_losses(root / ("single_" + batching)))
        return root, cache[batching]

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
def test_tp2_sp_matches_single_process(reference_run, tp2_sp_run):
    _assert_same(reference_run[1], train_losses(tp2_sp_run))


@pytest.mark.slow
@pytest.mark.parametrize("batching, layout, nproc", [
    ("packed", ["parallel.pp=2"], 2),
    ("packed", ["parallel.pp=2", "parallel.vpp=2"], 2),
    ("packed", [], 2),  # DP=2
    ("packed", ["parallel.tp=2", "parallel.pp=2"], 4),
    ("dynamic", ["parallel.tp=2", "parallel.sp=true"], 2),
    ("dynamic", ["parallel.pp=2"], 2),
], ids=["pp2-1f1b", "pp2-interleaved", "dp2", "tp2xpp2", "dynamic-tp2-sp", "dynamic-pp2"])
def test_layout_matches_single_process(baselines, batching, layout, nproc):
    root, (common, ref) = baselines(batching)
    out = root / (batching + "_" + "_".join(layout).replace("=", "").replace(".", "") + f"_n{nproc}")
    run_train(common + layout + [f"output_dir={out}"], nproc=nproc)
    _assert_same(ref, train_losses(out))
