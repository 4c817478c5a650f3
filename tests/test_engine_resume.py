"""Checkpoints: resume == uninterrupted (also across layouts), preemption by SIGUSR1, SIGKILL
during a save, and a checkpoint saved at TP=2 loading at TP=1 with the same per-token losses."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import ROOT, env, free_port, read_metrics, run_train, train_command, train_losses

STEPS = 5


@pytest.fixture(scope="module")
def base(tmp_path_factory, train_overrides):
    root = tmp_path_factory.mktemp("resume")
    common = train_overrides + [f"train.steps={STEPS}", "train.warmup_steps=1"]
    run_train(common + [f"output_dir={root / 'uninterrupted'}"])
    return root, common, train_losses(root / "uninterrupted")


def _assert_continues(ref: dict, out: Path):
    got = train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_resume_equals_uninterrupted_across_layouts(base):
    """Stop after step 1 at TP=2 (exit-duration guard), resume at TP=1: model, optimizer, LR
    schedule and data position all continue; metrics.jsonl is appended."""
    root, common, ref = base
    out = root / "tp2_then_tp1"
    run_train(common + [f"output_dir={out}", "parallel.tp=2", "train.exit_duration_minutes=1e-6"], nproc=2)
    assert _latest(out) == "step_0000001"
    assert [r["step"] for r in read_metrics(out)] == [1]
    run_train(common + [f"output_dir={out}"])
    _assert_continues(ref, out)
    assert len(read_metrics(out)) == STEPS  # appended, never overwritten or duplicated


@pytest.mark.slow
def test_sigusr1_saves_and_exits_then_resumes(base):
    root, common, ref = base
    out = root / "sigusr1"
    proc = subprocess.Popen(train_command(common + [f"output_dir={out}"]), cwd=ROOT, env=env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before the signal could be sent"
    proc.send_signal(signal.SIGUSR1)
    signalled_at = len(read_metrics(out))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    assert stopped < STEPS and stopped <= signalled_at + 1, "must stop within one step of the signal"
    assert _latest(out) == f"step_{stopped:07d}"
    assert "SIGUSR1" in stdout
    run_train(common + [f"output_dir={out}"])
    _assert_continues(ref, out)


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_previous_checkpoint(base):
    root, common, ref = base
    out = root / "sigkill"
    cmd = train_command(common + [f"output_dir={out}", "train.save_interval=2"])
    e = env(2)
    e["MFT_FAULT_SLEEP_IN_SAVE"] = "4:120"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = out / "checkpoints" / "step_0000004.tmp"
    deadline = time.time() + 300
    while not (tmp / "rng").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and tmp.exists(), "the step-4 save never started"
    proc.kill()
    proc.wait()
    assert _latest(out) == "step_0000002"  # the pointer still names the last complete save
    run_train(common + [f"output_dir={out}", "train.save_interval=2"])
    _assert_continues(ref, out)
    assert not tmp.exists()  # the broken save was cleaned up


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_with_same_logits(base):
    root, common, _ = base
    ckpt = root / "tp2_then_tp1" / "checkpoints" / "step_0000001"  # saved at TP=2 by the test above
    if not ckpt.is_dir():
        run_train(common + [f"output_dir={root / 'tp2_then_tp1'}", "parallel.tp=2",
                            "train.exit_duration_minutes=1e-6"], nproc=2)
    script = str(ROOT / "tests" / "scripts" / "checkpoint_loss.py")

    def losses(layout, nproc):
        head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(nproc), "--master_port", str(free_port())]
        p = subprocess.run(head + [script, str(ckpt)] + layout + ["data.seq_length=512"], cwd=ROOT, env=env(1), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][0]
        return json.loads(line[len("RESULT "):])

    at_tp2, at_tp1 = losses(["parallel.tp=2"], 2), losses([], 1)
    assert len(at_tp1) == 128
    assert max(abs(a - b) for a, b in zip(at_tp2, at_tp1)) < 1e-5
