"""Checkpoints: resume == uninterrupted (also across layouts), preemption by SIGUSR1 to every
process, SIGKILL during a save, and a checkpoint saved at TP=2 loading at TP=1 with the same
per-token losses.

The uninterrupted reference and the TP=2+SP run whose checkpoints are resumed and reloaded at
TP=1 are the session's (conftest ``reference_run`` and ``tp2_sp_run``, shared with
test_engine_layouts): this module starts only the runs that are interrupted or resumed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import REFERENCE_STEPS as STEPS
from train_helpers import ROOT, env, read_metrics, run_train, torchrun, train_command, train_losses


def _assert_continues(ref: dict, out: Path, first: int = 1):
    got = train_losses(out)
    assert sorted(got) == list(range(first, STEPS + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_resume_equals_uninterrupted_across_layouts(reference_run, tp2_sp_run, tmp_path):
    """The checkpoint the TP=2+SP run saved after step 1 resumes at TP=1 without SP: model,
    optimizer, LR schedule and data position all continue as in the uninterrupted run."""
    common, ref = reference_run
    ckpt = tp2_sp_run / "checkpoints" / "step_0000001"
    assert [r["step"] for r in read_metrics(tp2_sp_run)][0] == 1 and (ckpt / "run.json").is_file()
    out = tmp_path / "tp1"
    proc = run_train(common + [f"output_dir={out}", f"train.resume_from={ckpt}"])
    assert f"resumed from {ckpt} at step 1" in proc.stdout, proc.stdout[-3000:]
    _assert_continues(ref, out, first=2)


@pytest.mark.slow
def test_sigusr1_to_every_process_saves_exits_and_resumes(reference_run, tmp_path):
    """SLURM signals every process of a step (``--signal``, ``scancel``), the checkpoint writer's
    helper processes included (with default actions the helper died, and the save the signal asked
    for hung): SIGUSR1 to the whole process group after a save stops the run within one step with
    a checkpoint, exit 0; the resumed run appends to metrics.jsonl and ends as the uninterrupted one.

    The signal goes out once step 1's save is published; the save of step 3 holds the run for a
    minute (the fault hook), so however late a busy machine delivers the signal, the run stops
    before step 4 (in the usual case at step 2, and the pause never starts)."""
    common, ref = reference_run
    out = tmp_path / "sigusr1"
    e = env(2)
    e["MFT_FAULT_SLEEP_IN_SAVE"] = "3:60"
    proc = subprocess.Popen(train_command(common + [f"output_dir={out}", "train.save_interval=1"]), cwd=ROOT,
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a SLURM step's processes
    latest = out / "checkpoints" / "latest"
    try:
        deadline = time.time() + 600  # a loaded machine
        while not latest.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and latest.exists(), "no first save"
        os.killpg(proc.pid, signal.SIGUSR1)  # the trainer and every helper it started
        signalled_at = len(read_metrics(out))
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    assert stopped < STEPS and stopped <= signalled_at + 1, f"must stop within one step of the signal (sent after " \
                                                           f"step {signalled_at}), stopped at {stopped}"
    assert f"stopping at step {stopped}: SIGUSR1" in stdout
    assert _latest(out) == f"step_{stopped:07d}"
    run_train(common + [f"output_dir={out}"])
    _assert_continues(ref, out)
    assert len(read_metrics(out)) == STEPS  # appended, never overwritten or duplicated


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_previous_checkpoint(reference_run, tmp_path):
    common, ref = reference_run
    out = tmp_path / "sigkill"
    cmd = train_command(common + [f"output_dir={out}", "train.save_interval=2"])
    e = env(2)
    e["MFT_FAULT_SLEEP_IN_SAVE"] = "4:120"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = out / "checkpoints" / "step_0000004.tmp"
    try:
        deadline = time.time() + 600  # a loaded machine
        while not (tmp / "rng").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and tmp.exists(), "the step-4 save never started"
    finally:
        proc.kill()  # SIGKILL in the save (and no run left behind if the assertion failed)
        proc.wait()
    assert _latest(out) == "step_0000002"  # the pointer still names the last complete save
    run_train(common + [f"output_dir={out}", "train.save_interval=2"])
    _assert_continues(ref, out)
    assert not tmp.exists()  # the broken save was cleaned up


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_with_same_logits(tp2_sp_run):
    ckpt = tp2_sp_run / "checkpoints" / "step_0000001"  # saved at TP=2 (+SP)
    script = str(ROOT / "tests" / "scripts" / "checkpoint_loss.py")

    def losses(layout, nproc):
        head = [sys.executable] if nproc == 1 else torchrun(nproc)
        p = subprocess.run(head + [script, str(ckpt)] + layout + ["data.seq_length=512"], cwd=ROOT, env=env(1), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][0]
        return json.loads(line[len("RESULT "):])

    at_tp2, at_tp1 = losses(["parallel.tp=2"], 2), losses([], 1)
    assert len(at_tp1) == 128
    assert max(abs(a - b) for a, b in zip(at_tp2, at_tp1)) < 1e-5
