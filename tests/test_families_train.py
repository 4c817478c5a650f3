"""Training a non-Llama family through the CLI: StarCoder2 (LayerNorm with bias, biases on every
linear, GELU-tanh MLP, tied embeddings, sliding window shorter than the packed samples) from a
Hugging Face folder (``model.hf_init``) on the demo data: the loss goes down, and TP=2 with
sequence parallelism gives the single-process losses step for step."""

from __future__ import annotations

import pytest

from test_families_fixtures import make_family_model
from train_helpers import run_train, train_losses

STEPS = 4


@pytest.fixture(scope="module")
def starcoder2_run(tmp_path_factory, demo_data):
    """The HF folder (vocabulary of the demo tokenizer, 2048) and the overrides of a short run."""
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, model_section, read_hf_config

    root = tmp_path_factory.mktemp("sc2_train")
    hf = make_family_model("starcoder2", root / "hf", seed=4, vocab_size=2048, sliding_window=64)
    model = model_section(model_config_from_hf(read_hf_config(hf)))
    overrides = [f"model.{k}={v}" for k, v in model.items()] + [
        f"model.hf_init={hf}", "data.source=offline", f"data.path={demo_data}", "data.seq_length=512",
        f"train.steps={STEPS}", "train.eval_interval=0", "train.save_interval=0", "train.global_batch_size=4"]
    out = root / "tp1"
    run_train(overrides + [f"output_dir={out}"])
    return overrides, train_losses(out), root


def test_starcoder2_trains_through_the_cli(starcoder2_run):
    _, losses, _ = starcoder2_run
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS]["loss"] < losses[1]["loss"] - 0.05, [losses[s]["loss"] for s in losses]


@pytest.mark.slow
def test_starcoder2_tp2_sp_equals_tp1(starcoder2_run):
    overrides, single, root = starcoder2_run
    out = root / "tp2"
    run_train(overrides + ["parallel.tp=2", "parallel.sp=true", f"output_dir={out}"], nproc=2)
    tp2 = train_losses(out)
    for step in range(1, STEPS + 1):
        assert abs(tp2[step]["loss"] - single[step]["loss"]) <= 1e-5 * abs(single[step]["loss"]), step
