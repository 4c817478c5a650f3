"""PreemptionGuard: signals are recorded, exit duration fires, and all ranks agree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_helpers import free_port

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


AGREE = r"""
import json, os, signal, sys, time
import torch.distributed as dist
from megatron_mft.launch.signals import PreemptionGuard
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
guard = PreemptionGuard()
answers = []
for step in range(4):
    if step == 2 and rank == 1:  # only rank 1 is signalled
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
    answers.append(guard.should_stop())
print(json.dumps(answers))
dist.destroy_process_group()
"""


def test_ranks_agree_on_the_stop_step():
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(r), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == [None, None, "SIGUSR1", "SIGUSR1"]
