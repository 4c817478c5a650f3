"""LoRA / QLoRA through the training CLI: adapter-only checkpoints, exact resume across layouts."""

import pytest
import torch.distributed.checkpoint as dcp

from train_helpers import read_metrics, run_train, train_losses

STEPS = 3


def _model_keys(ckpt):
    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    return [k for k in keys if k.startswith("decoder.") or k.startswith("embedding.") or k.startswith("output_layer.")]


@pytest.mark.slow
def test_lora_tp2_sp_resumes_at_tp1_like_uninterrupted(tmp_path, train_overrides):
    common = train_overrides + [f"train.steps={STEPS}", "train.warmup_steps=1", "peft.method=lora", "peft.rank=4",
                                "train.lr=1e-2"]
    run_train(common + [f"output_dir={tmp_path / 'ref'}"])
    ref = train_losses(tmp_path / "ref")
    assert ref[STEPS]["loss"] < ref[1]["loss"]
    out = tmp_path / "stopped"
    run_train(common + [f"output_dir={out}", "parallel.tp=2", "parallel.sp=true", "train.exit_duration_minutes=1e-6"],
              nproc=2)
    keys = _model_keys(out / "checkpoints" / "step_0000001")
    assert keys and all(".lora_" in k for k in keys), keys  # adapters only, no base weights
    run_train(common + [f"output_dir={out}"])
    got = train_losses(out)
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step


@pytest.mark.slow
def test_qlora_trains_from_a_base_checkpoint(tmp_path, train_overrides):
    out = tmp_path / "qlora"
    proc = run_train(train_overrides + [f"output_dir={out}", "train.steps=3", "train.warmup_steps=0",
                                        "peft.method=qlora", "train.lr=1e-2"])
    assert "NF4" in proc.stdout and "trainable" in proc.stdout
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    keys = _model_keys(out / "checkpoints" / "step_0000003")
    assert keys and all(".lora_" in k for k in keys)
