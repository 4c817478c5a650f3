"""Training every family through the CLI from a Hugging Face folder (``model.hf_init``) on the demo
data: a few steps of each family's tiny model (tests/test_families_fixtures.py, vocabulary of the
demo tokenizer) and the loss goes down. Each keeps its distinguishing features: Llama-3 tied
embeddings + llama3 RoPE scaling, Qwen2.5 QKV bias (tied here, as the small Qwen2.5 sizes), DeepSeek-Coder
linear RoPE scaling past its 16 positions, Mistral and StarCoder2 sliding windows (64) shorter than
the packed samples, StarCoder2 LayerNorm with bias, biases on every linear, GELU-tanh MLP.

TP=2 with sequence parallelism gives the single-process losses step for step for StarCoder2
(biases on every linear, LayerNorm bias, window) and Qwen2.5 (QKV bias split by heads, tied
embeddings): one torchrun case each."""

from __future__ import annotations

import pytest

from test_families_fixtures import make_family_model
from train_helpers import run_many, train_losses

STEPS = 10
#: family -> overrides of its tiny config for the run (the demo tokenizer's 2048 ids)
TRAINED = {
    "llama3": {},
    "qwen2": {"tie_word_embeddings": True},
    "deepseek": {},
    "mistral": {"sliding_window": 64},
    "starcoder2": {"sliding_window": 64},
}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, demo_data):
    """name -> (overrides of its run, its single-process losses, its folder): every family's run in
    one process (tests/train_many.py)."""
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, model_section, read_hf_config

    root = tmp_path_factory.mktemp("family_train")
    overrides = {}
    for name in TRAINED:
        hf = make_family_model(name, root / name / "hf", seed=4, embed_std=0.1, vocab_size=2048, **TRAINED[name])
        model = model_section(model_config_from_hf(read_hf_config(hf)))
        overrides[name] = [f"model.{k}={v}" for k, v in model.items()] + [
            f"model.hf_init={hf}", "data.source=offline", f"data.path={demo_data}", "data.seq_length=512",
            f"train.steps={STEPS}", "train.eval_interval=0", "train.save_interval=0", "train.global_batch_size=4"]
    run_many({name: argv + [f"output_dir={root / name / 'tp1'}"] for name, argv in overrides.items()}, root)
    return {name: (argv, train_losses(root / name / "tp1"), root / name) for name, argv in overrides.items()}


@pytest.fixture(scope="module")
def tp2_runs(family_runs, tmp_path_factory):
    """name -> TP=2 + SP losses, the two torchrun cases in one launch."""
    spec = tmp_path_factory.mktemp("family_tp2")
    names = ["starcoder2", "qwen2"]
    run_many({name: family_runs[name][0] + ["parallel.tp=2", "parallel.sp=true",
                                            f"output_dir={family_runs[name][2] / 'tp2'}"] for name in names},
             spec, nproc=2)
    return {name: train_losses(family_runs[name][2] / "tp2") for name in names}


@pytest.mark.parametrize("name", list(TRAINED))
def test_family_trains_through_the_cli(family_runs, name):
    overrides, losses, _ = family_runs[name]
    assert sorted(losses) == list(range(1, STEPS + 1))
    curve = [losses[s]["loss"] for s in sorted(losses)]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve  # steps see different batches: means
    feature = {"llama3": "model.tied_embeddings=True", "qwen2": "model.qkv_bias=True",
               "deepseek": "model.rope_type=linear", "mistral": "model.sliding_window=64",
               "starcoder2": "model.linear_bias=True"}[name]
    assert feature in overrides, overrides  # the run really had the family's feature


@pytest.mark.slow
@pytest.mark.parametrize("name", ["starcoder2", "qwen2"])
def test_family_tp2_sp_equals_tp1(family_runs, tp2_runs, name):
    single, tp2 = family_runs[name][1], tp2_runs[name]
    for step in range(1, STEPS + 1):
        assert abs(tp2[step]["loss"] - single[step]["loss"]) <= 1e-5 * abs(single[step]["loss"]), step
