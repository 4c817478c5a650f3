"""LoRA / QLoRA through the training CLI: adapter-only checkpoints, exact resume across layouts.

Two launches: the TP=2 + SP LoRA run stopped after step 1 (torchrun), then every single-process
run in one process (tests/train_many.py): the uninterrupted LoRA reference, that stopped run
resumed at TP=1, and a QLoRA run."""

import pytest
import torch.distributed.checkpoint as dcp

from train_helpers import read_metrics, run_many, run_train, train_losses

STEPS = 3


def _model_keys(ckpt):
    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    return [k for k in keys if k.startswith("decoder.") or k.startswith("embedding.") or k.startswith("output_layer.")]


@pytest.fixture(scope="module")
def peft_runs(tmp_path_factory, train_overrides):
    """name -> (output_dir, stdout); "stopped_keys": the model keys of the TP=2 run's step-1 checkpoint."""
    tmp = tmp_path_factory.mktemp("engine_peft")
    lora = train_overrides + [f"train.steps={STEPS}", "train.warmup_steps=1", "peft.method=lora", "peft.rank=4",
                              "train.lr=1e-2"]
    stopped = tmp / "stopped"
    run_train(lora + [f"output_dir={stopped}", "parallel.tp=2", "parallel.sp=true",
                      "train.exit_duration_minutes=1e-6"], nproc=2)
    keys = _model_keys(stopped / "checkpoints" / "step_0000001")  # before the resume adds checkpoints
    runs = {
        "ref": lora + [f"output_dir={tmp / 'ref'}"],
        "stopped": lora + [f"output_dir={stopped}"],  # resumed at TP=1
        "qlora": train_overrides + [f"output_dir={tmp / 'qlora'}", "train.steps=3", "train.warmup_steps=0",
                                    "peft.method=qlora", "train.lr=1e-2"],
    }
    logs = run_many(runs, tmp)
    return {name: (tmp / name, logs[name][0]) for name in runs} | {"stopped_keys": keys}


@pytest.mark.slow
def test_lora_tp2_sp_resumes_at_tp1_like_uninterrupted(peft_runs):
    ref = train_losses(peft_runs["ref"][0])
    assert ref[STEPS]["loss"] < ref[1]["loss"]
    keys = peft_runs["stopped_keys"]
    assert keys and all(".lora_" in k for k in keys), keys  # adapters only, no base weights
    out, stdout = peft_runs["stopped"]
    assert "resumed from" in stdout, stdout[-3000:]
    got = train_losses(out)
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step


@pytest.mark.slow
def test_qlora_trains_from_a_base_checkpoint(peft_runs):
    out, stdout = peft_runs["qlora"]
    assert "NF4" in stdout and "trainable" in stdout
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    keys = _model_keys(out / "checkpoints" / "step_0000003")
    assert keys and all(".lora_" in k for k in keys)
