"""PreemptionGuard: signals are recorded, exit duration fires, and all ranks agree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import env, read_metrics, train_command

from megatron_mft.launch.env import launcher_store
from megatron_mft.launch.signals import PreemptionGuard

ROOT = Path(__file__).resolve().parents[1]

SELF_SIGNAL = r"""
import os, signal, sys, time
from megatron_mft.launch.signals import PreemptionGuard
guard = PreemptionGuard(stop_file=sys.argv[2])
assert guard.should_stop() is None
os.kill(os.getpid(), getattr(signal, sys.argv[1]))
time.sleep(0.05)  # the handler runs between bytecodes; nothing is raised
print(guard.should_stop(), guard.should_stop())
"""


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                                            **(env or {})})


def test_sigusr1_and_sigterm_are_recorded_not_fatal(tmp_path):
    for name in ("SIGUSR1", "SIGTERM"):
        stop_file = tmp_path / f"stop.{name}"
        run = _run(SELF_SIGNAL, name, str(stop_file))
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [name, name]  # latched
        assert stop_file.read_text().strip() == name


def test_exit_duration():
    guard = PreemptionGuard(exit_duration_minutes=0.001 / 60, install=False)  # 1 ms
    time.sleep(0.01)
    assert guard.should_stop() == "exit_duration"
    assert PreemptionGuard(exit_duration_minutes=0, install=False).should_stop() is None
    assert PreemptionGuard(exit_duration_minutes=60, install=False).should_stop() is None


def test_install_and_uninstall_restore_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGUSR1) == guard._handler
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert guard.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_stop_signal_during_the_teardown_does_not_kill_the_trainer():
    """CI: an ``scancel -s USR1`` stopped the run, and SLURM's own time-limit warning came 8 s later,
    while the trainer tore down after its save: the guard had restored SIGUSR1's default action
    and the task died by signal 10 (job FAILED instead of COMPLETED)."""
    code = ("import os, signal, time\n"
            "from megatron_mft.launch.signals import PreemptionGuard, catch_early\n"
            "catch_early()\n"
            "guard = PreemptionGuard()\n"
            "guard.uninstall()  # Recipe.cleanup, before the process group's teardown\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.05)\n"
            "print('alive')\n")
    run = _run(code)
    assert (run.returncode, run.stdout.strip()) == (0, "alive"), run.stderr


SHIELD = r"""
import os, signal, sys, threading, time
from megatron_mft.launch.signals import catch_early, shield_checkpoint_helper
from megatron.core.dist_checkpointing.strategies import filesystem_async
catch_early()
os.environ["MFT_TEST_SLOW_START"] = "2"  # the helper's interpreter sleeps 2 s in sitecustomize
threading.Timer(1.0, os.killpg, (os.getpgid(0), signal.SIGUSR1)).start()  # SLURM signals the step
shield_checkpoint_helper()
filesystem_async._results_queue.put("alive")
print(filesystem_async._results_queue.get())
"""


def test_a_stop_signal_while_the_checkpoint_helper_starts_does_not_kill_it(tmp_path):
    """CI: SLURM's time-limit warning reached a requeued job while megatron's checkpoint-writer
    helper was starting, before it could ignore SIGUSR1: the helper died and both ranks failed
    with EOFError. Here the helper's interpreter is held in start-up while the signal comes."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('MFT_TEST_SLOW_START'):\n    time.sleep(float(os.environ['MFT_TEST_SLOW_START']))\n")
    run = subprocess.run([sys.executable, "-c", SHIELD], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         start_new_session=True,  # its own process group, which the signal goes to
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert (run.returncode, run.stdout.strip()) == (0, "alive"), run.stderr[-3000:]


ORPHAN = r"""
import multiprocessing, time
from megatron_mft.launch.signals import shield_checkpoint_helper
shield_checkpoint_helper()
print(*[p.pid for p in multiprocessing.active_children()], flush=True)
time.sleep(300)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_checkpoint_helper_goes_when_the_trainer_is_killed():
    """A trainer killed outright (SIGKILL, the OOM killer) runs no exit handler, and megatron's
    checkpoint-writer helper, which ignores SIGTERM, lived on for ever (four such orphans after
    one suite run). It now dies with the trainer."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    try:
        helpers = [int(p) for p in proc.stdout.readline().split()]
        assert helpers and all(_running(p) for p in helpers), proc.stderr.read()[-3000:] if proc.poll() else helpers
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 20
    while any(_running(p) for p in helpers) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in helpers if _running(p)]
    for p in left:  # do not leave it behind when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"the helper outlived the killed trainer: {left}"


AGREE = r"""
import json, os, signal, sys, time
import torch.distributed as dist
from megatron_mft.launch.env import join_launcher_store
from megatron_mft.launch.agree import agree, any_rank, every_rank
from megatron_mft.launch.signals import PreemptionGuard
rank = int(sys.argv[1])
join_launcher_store(rank, 2, int(sys.argv[2]), backend="gloo", timeout_minutes=1)  # a hang fails within a minute
guard = PreemptionGuard()
answers = []
for step in range(4):
    if step == 2 and rank == 1:  # only rank 1 is signalled
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
    answers.append(guard.should_stop())
agreed = [any_rank(rank == 1), every_rank(rank == 1), agree(3 + rank, "min"), agree(3 + rank, "max")]
# a save whose preparation fails on rank 0 alone (its checkpoints folder is a file)
from megatron_mft.checkpoint.dist import save_checkpoint
try:
    save_checkpoint(sys.argv[3], 1, [], common={}, run_info={})
    saved = "saved"
except Exception as e:
    saved = f"{type(e).__name__}: {e}"
print(json.dumps({"stop": answers, "agreed": agreed, "save": saved}), flush=True)
dist.destroy_process_group()
os._exit(0)  # seen once under load: "terminate called without an active exception" from a thread that
             # torch left joinable, at the interpreter's exit after the failed save; not what this checks
"""


def test_ranks_agree_on_the_stop_step_and_on_a_failed_save(tmp_path):
    """One 2-process gloo job: the guard's answer, the agreement helper, and a checkpoint save
    whose folder rank 0 cannot prepare (the other rank used to wait in a barrier for ever): every
    rank raises rank 0's message."""
    not_a_folder = tmp_path / "checkpoints"
    not_a_folder.write_text("a file where the checkpoints folder belongs\n")
    store = launcher_store(2)  # served until the ranks are done
    port = str(store.port)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(r), port, str(not_a_folder)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["stop"] == outs[1]["stop"] == [None, None, "SIGUSR1", "SIGUSR1"]
    assert outs[0]["agreed"] == outs[1]["agreed"] == [True, False, 3, 4]
    for out in outs:
        assert out["save"].startswith("CheckpointError: cannot save checkpoint "), out["save"]
        assert f"preparing {not_a_folder / 'step_0000001.tmp'} on rank 0 failed (FileExistsError" in out["save"]
    assert not_a_folder.read_text() == "a file where the checkpoints folder belongs\n"  # untouched


def _wait_until_torch_is_loading(pid: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Past the entry point, long before the trainer's PreemptionGuard exists (it is made after
    the model, data and optimizer): the process has mapped libtorch."""
    maps = Path(f"/proc/{pid}/maps")
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"the trainer never loaded torch (exit {proc.poll()})")


@pytest.mark.slow
def test_sigusr1_during_start_up_stops_after_the_first_step(tmp_path, train_overrides):
    """SLURM's time-limit warning (--signal=USR1@N) comes up to a minute early, and a start-up
    that loads a large checkpoint takes minutes: a SIGUSR1 before the guard exists must not
    kill the task (the default action), which failed the job instead of saving and requeueing
    (seen with a real slurmctld, tests/slurm). It is kept: the run stops after step 1, saved."""
    out, stop_file = tmp_path / "run", tmp_path / "stop_reason"
    e = env(2)
    e["MFT_STOP_FILE"] = str(stop_file)
    proc = subprocess.Popen(train_command(train_overrides + [f"output_dir={out}", "train.steps=5"]), cwd=ROOT,
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_until_torch_is_loading(proc.pid, proc)
        assert not (out / "metrics.jsonl").exists()
        proc.send_signal(signal.SIGUSR1)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{stdout[-3000:]}"
    assert "stopping at step 1: SIGUSR1" in stdout
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert stop_file.read_text().strip() == "SIGUSR1"  # what run_scripts/common.sh requeues on


# SIGUSR1 to every process of the trainer after a save (the checkpoint writer's helper included):
# test_engine_resume.py::test_sigusr1_to_every_process_saves_exits_and_resumes, which resumes the run too


def test_the_entry_point_catches_sigusr1_before_it_loads_torch():
    """Importing torch takes seconds, and a SIGUSR1 in that window killed the task (CI saw exit
    -10): the trainer's module imports nothing that loads torch before ``catch_early`` runs."""
    code = ("import sys, megatron_mft.train as t; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('megatron.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
