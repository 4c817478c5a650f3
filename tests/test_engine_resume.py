"""Checkpoints: resume == uninterrupted (also across layouts), preemption by SIGUSR1 to every
process, SIGKILL during a save, and a checkpoint saved at TP=2 loading at TP=1 with the same
per-token losses.

The uninterrupted reference and the TP=2+SP run whose checkpoints are resumed and reloaded at
TP=1 are the session's (conftest ``reference_run`` and ``tp2_sp_run``, shared with
test_engine_layouts): this module starts only the runs that are interrupted, and one process
that resumes them all (tests/train_many.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import REFERENCE_STEPS as STEPS
from train_helpers import ROOT, env, read_metrics, run_many, torchrun, train_command, train_losses


def _assert_continues(ref: dict, out: Path, first: int = 1):
    got = train_losses(out)
    assert sorted(got) == list(range(first, STEPS + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _sigusr1_run(common: list, out: Path) -> dict:
    """SIGUSR1 to the trainer's whole process group once step 1's save is published. The save of
    step 3 holds the run for a minute (the fault hook), so however late a busy machine delivers
    the signal, the run stops before step 4 (in the usual case at step 2, and the pause never
    starts). What was seen, before any resume."""
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
    return {"returncode": proc.returncode, "stdout": stdout, "signalled_at": signalled_at,
            "stopped": read_metrics(out)[-1]["step"], "latest": _latest(out)}


def _sigkill_run(common: list, out: Path) -> dict:
    """SIGKILL while the step-4 save is held by the fault hook; what was seen, before any resume."""
    e = env(2)
    e["MFT_FAULT_SLEEP_IN_SAVE"] = "4:120"
    proc = subprocess.Popen(train_command(common + [f"output_dir={out}", "train.save_interval=2"]), cwd=ROOT, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = out / "checkpoints" / "step_0000004.tmp"
    try:
        deadline = time.time() + 600  # a loaded machine
        while not (tmp / "rng").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and tmp.exists(), "the step-4 save never started"
    finally:
        proc.kill()  # SIGKILL in the save (and no run left behind if the assertion failed)
        proc.wait()
    return {"latest": _latest(out), "tmp": tmp}


@pytest.fixture(scope="module")
def resumed(reference_run, tp2_sp_run, tmp_path_factory):
    """The interrupted runs (SIGUSR1 after a save, SIGKILL in a save), then every resume of this
    module in one process (tests/train_many.py): the TP=2+SP run's step-1 checkpoint at TP=1, the
    two interrupted runs, and a copy of the whole TP=2+SP run resumed at TP=1 from its step 2
    (``earlier``). name -> (output_dir, what was seen before the resume, its stdout)."""
    common, _ = reference_run
    root = tmp_path_factory.mktemp("resume")
    shutil.copytree(tp2_sp_run, root / "earlier")
    seen = {"sigusr1": _sigusr1_run(common, root / "sigusr1"), "sigkill": _sigkill_run(common, root / "sigkill"),
            "layouts": {"ckpt": tp2_sp_run / "checkpoints" / "step_0000001"},
            "earlier": {"metrics": (root / "earlier" / "metrics.jsonl").read_text().splitlines(keepends=True)}}
    seen["sigkill"]["metrics"] = read_metrics(root / "sigkill")
    logs = run_many({
        "layouts": common + [f"output_dir={root / 'layouts'}", f"train.resume_from={seen['layouts']['ckpt']}"],
        "sigusr1": common + [f"output_dir={root / 'sigusr1'}"],
        "sigkill": common + [f"output_dir={root / 'sigkill'}", "train.save_interval=2"],
        "earlier": common + [f"output_dir={root / 'earlier'}", "train.resume_from=2"],
    }, root)
    return {name: (root / name, seen[name], logs[name][0]) for name in seen}


@pytest.mark.slow
def test_resume_equals_uninterrupted_across_layouts(reference_run, tp2_sp_run, resumed):
    """The checkpoint the TP=2+SP run saved after step 1 resumes at TP=1 without SP: model,
    optimizer, LR schedule and data position all continue as in the uninterrupted run."""
    _, ref = reference_run
    out, seen, stdout = resumed["layouts"]
    ckpt = seen["ckpt"]
    assert [r["step"] for r in read_metrics(tp2_sp_run)][0] == 1 and (ckpt / "run.json").is_file()
    assert f"resumed from {ckpt} at step 1" in stdout, stdout[-3000:]
    _assert_continues(ref, out, first=2)


@pytest.mark.slow
def test_sigusr1_to_every_process_saves_exits_and_resumes(reference_run, resumed):
    """SLURM signals every process of a step (``--signal``, ``scancel``), the checkpoint writer's
    helper processes included (with default actions the helper died, and the save the signal asked
    for hung): SIGUSR1 to the whole process group after a save stops the run within one step with
    a checkpoint, exit 0; the resumed run appends to metrics.jsonl and ends as the uninterrupted one."""
    _, ref = reference_run
    out, seen, _ = resumed["sigusr1"]
    stdout, stopped, signalled_at = seen["stdout"], seen["stopped"], seen["signalled_at"]
    assert seen["returncode"] == 0, stdout[-3000:]
    assert stopped < STEPS and stopped <= signalled_at + 1, f"must stop within one step of the signal (sent after " \
                                                           f"step {signalled_at}), stopped at {stopped}"
    assert f"stopping at step {stopped}: SIGUSR1" in stdout
    assert seen["latest"] == f"step_{stopped:07d}"
    _assert_continues(ref, out)
    assert len(read_metrics(out)) == STEPS  # appended, never overwritten or duplicated


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_previous_checkpoint(reference_run, resumed):
    _, ref = reference_run
    out, seen, _ = resumed["sigkill"]
    assert seen["latest"] == "step_0000002"  # the pointer still names the last complete save
    _assert_continues(ref, out)
    assert not seen["tmp"].exists()  # the broken save was cleaned up
    assert [r["step"] for r in seen["metrics"]] == [1, 2, 3, 4]  # logged before the kill in step 4's save
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # 3 and 4 once: the earlier ones set aside
    (side,) = out.glob("metrics.superseded.*.jsonl")
    assert [json.loads(line) for line in side.read_text().splitlines()] == seen["metrics"][2:]


@pytest.mark.slow
def test_resume_from_an_earlier_step_logs_each_step_once(reference_run, resumed):
    """``train.resume_from=2`` in a run whose metrics.jsonl holds steps 1-4 appended steps 3-4 a
    second time (two series for every reader). Now the earlier lines of steps 3-4 move to a side
    file first: metrics.jsonl holds each step once, 3 and 4 as the resumed run logged them."""
    _, ref = reference_run
    out, seen, stdout = resumed["earlier"]
    old = seen["metrics"]
    assert [json.loads(line)["step"] for line in old] == [1, 2, 3, 4]
    (side,) = out.glob("metrics.superseded.*.jsonl")
    assert f"moved 2 line(s) of steps after 2 from {out / 'metrics.jsonl'} to {side}" in stdout, stdout[-3000:]
    assert side.read_text().splitlines(keepends=True) == old[2:]  # the earlier lines, byte for byte
    now = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in now] == [1, 2, 3, 4] and now[:2] == old[:2]
    assert not set(now[2:]) & set(old[2:])  # steps 3-4 are the resumed run's lines (its own timings)
    _assert_continues(ref, out)


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


def test_a_resume_trains_on_the_runs_own_lr_schedule():
    """A resume may change the schedule (more ``train.steps``, another warmup, decay, LR, min LR,
    weight decay: printed as changed settings). From the checkpoint's step the LR and weight decay
    are the new run's, as if it had started with them; megatron's scheduler kept the checkpoint's
    by default."""
    from megatron_mft.config import load_config
    from megatron_mft.training.optimizer import build_scheduler

    def scheduler(overrides: list, steps: int):
        cfg = load_config(None, ["data.path=/unused", f"train.steps={steps}", *overrides])
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        return build_scheduler(opt, cfg, steps), opt

    old, _ = scheduler(["train.warmup_steps=2", "train.lr=1e-3", "train.min_lr=1e-5", "train.weight_decay=0.1"], 6)
    for _ in range(4):
        old.step(increment=1)
    new = ["train.warmup_steps=3", "train.lr=2e-3", "train.min_lr=0", "train.weight_decay=0.05"]
    resumed, resumed_opt = scheduler(new, 12)
    resumed.load_state_dict(old.state_dict())
    fresh, fresh_opt = scheduler(new, 12)
    for _ in range(4):
        fresh.step(increment=1)
    assert resumed.num_steps == fresh.num_steps == 4
    for step in range(4, 12):
        got = [(g["lr"], g["weight_decay"]) for g in resumed_opt.param_groups]
        assert got == [(g["lr"], g["weight_decay"]) for g in fresh_opt.param_groups], step
        assert got[0][1] == 0.05 and 0 < got[0][0] <= 2e-3, (step, got)
        if step == 4:
            assert got[0][0] != old.get_lr(old.optimizer.param_groups[0]), "the two schedules must differ here"
        resumed.step(increment=1)
        fresh.step(increment=1)
