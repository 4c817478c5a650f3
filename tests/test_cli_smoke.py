"""The shipped tiny config end to end through the CLI (online data path, validation, CoBa
balancer, early stopping bookkeeping, metrics fields, plot), and config errors at the CLI."""

import subprocess
import sys

import pytest

from train_helpers import ROOT, env, read_metrics, run_train


@pytest.mark.slow
def test_tiny_config_online_with_balancer(tmp_path):
    out = tmp_path / "run"
    run_train([f"output_dir={out}", "train.steps=4", "train.eval_interval=2", "train.eval_iters=1", "train.tensorboard=true",
               "loss.balancer=coba", "loss.balancer_interval=2", "train.early_stopping_patience=5",
               "data.seq_length=512"])
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if any(k.startswith("val_loss/") for k in r)]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    required = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "hw_tflops_per_gpu", "mfu"}
    assert required <= set(train[0])
    tasks = {"code-completion", "docstring", "doctest", "text-to-code"}
    assert {k.split("/", 1)[1] for k in train[-1] if k.startswith("task_weight/")} == tasks
    assert any(k.startswith("task_loss/") for k in train[-1])
    assert [r["step"] for r in val] == [2, 4]
    assert {k.split("/", 1)[1] for k in val[-1] if k.startswith("val_loss/")} == tasks
    assert train[-1]["tokens_per_s"] > 0 and train[-1]["mfu"] is None  # CPU: no known peak, no MFU claimed
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "task_loss/docstring", "val_loss/doctest"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    png = out / "loss.png"
    subprocess.run([sys.executable, "-m", "megatron_mft.plot", "--metrics", str(out / "metrics.jsonl"),
                    "--out", str(png)], check=True, cwd=ROOT, env=env())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_every_config_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "megatron_mft.train", "--config", "examples/tiny_cpu.yaml",
                        "parallel.tp=3", "train.lr=-1", "loss.mode=nope"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    for needle in ("parallel.tp: 3 does not divide", "train.lr: must be > 0", "loss.mode"):
        assert needle in p.stderr, p.stderr


@pytest.mark.slow
def test_early_stopping_stops_a_diverging_run(tmp_path, train_overrides):
    out = tmp_path / "diverge"
    proc = run_train(train_overrides + [f"output_dir={out}", "train.steps=12", "train.eval_interval=1",
                                        "train.eval_iters=1", "train.early_stopping_patience=2", "train.lr=3.0",
                                        "train.min_lr=0.1", "train.warmup_steps=0", "train.clip_grad=0"])
    assert "early stopping" in proc.stdout
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3]  # evaluations after steps 2 and 3 did not beat step 1's
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"
