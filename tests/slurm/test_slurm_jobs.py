"""run_scripts/tiny_cpu.sh submitted to a real single-node SLURM: sbatch, signals, requeue, resume.

All jobs are submitted at once at the start of the module and driven side by side (each in a
thread: submit, wait, signal, wait), so their waits overlap; each test then checks one job's
outcome. The references are the session's (conftest): the single-process run of the same
config (``reference_run``: every layout of test_engine_layouts reproduces its losses) and the
same run under torchrun at TP=2 (+SP, ``tp2_sp_run``: its checkpoint files).

1. ``sbatch`` runs 2 tasks at TP=2 to completion: per-step losses as the single-process run,
   checkpoint files as from torchrun.
2. ``scancel -s USR1`` (after a periodic save): save, exit 0, ``scontrol requeue``; the requeued
   job resumes at the saved step and finishes; every step logged once; losses as uninterrupted.
3. ``--time=2 --signal=USR1@1``: slurmctld's warning comes before the limit, the job saves and
   requeues itself, and the requeued run resumes at the saved step.
5. ... that job has ``MAX_RESTARTS=1``: the next USR1 stops it without a requeue, and says why.
4. ``scancel`` (SIGTERM, after a periodic save): saves, the job ends CANCELLED, no requeue.
6. One task SIGKILLed: ``--kill-on-bad-exit`` ends the job (FAILED); the last complete checkpoint
   loads: the resubmitted job resumes from it and ends with the reference's losses.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from train_helpers import REFERENCE_STEPS, ROOT, read_metrics, train_losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = ROOT / "run_scripts" / "tiny_cpu.sh"
STEPS = REFERENCE_STEPS  # the session's reference runs: 4 steps, warmup 1
WAIT = 600  # seconds any one wait may take on a busy machine before the test gives up
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


@dataclass
class Job:
    cluster: object
    name: str
    id: str
    out: Path  # OUTPUT_DIR
    log: Path  # sbatch --output (both runs of a requeued job, appended)

    def fields(self) -> dict[str, str]:
        """scontrol's record of the job; a failed call (an RPC a loaded slurmctld dropped) is retried."""
        for attempt in range(5):
            proc = self.cluster.run("scontrol", "-o", "show", "job", self.id, check=attempt == 4, timeout=30)
            if proc.returncode == 0:
                return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
            time.sleep(1)

    def state(self) -> str:
        return self.fields()["JobState"]

    def queued(self) -> bool:
        """Still known to squeue (pending, running or completing); a failed squeue answers yes (its
        empty output once let a wait end while the job was still COMPLETING)."""
        ids = self.cluster.job_ids()
        return ids is None or self.id in ids

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def steps(self) -> list[int]:
        path = self.out / "metrics.jsonl"
        return [r["step"] for r in read_metrics(self.out) if "loss" in r] if path.exists() else []

    def describe(self) -> str:
        return (f"job {self.id} ({self.name}): {self.fields()}\n--- {self.log}\n{self.text()[-4000:]}\n"
                f"{self.cluster.logs(2000)}")

    def wait(self, what: str, ready, timeout: float = WAIT, poll: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.describe()}")

    def wait_done(self) -> dict[str, str]:
        """Until the job has left the queue (its processes are gone); its final fields."""
        self.wait("the job to end", lambda: not self.queued() and self.state() in FINAL)
        f = self.fields()
        assert f["JobState"] in FINAL, self.describe()
        return f

    def wait_steps(self, n: int) -> None:
        self.wait(f"{n} logged step(s)", lambda: len(self.steps()) >= n or not self.queued())
        assert len(self.steps()) >= n, f"the job ended before step {n}\n{self.describe()}"

    def signal(self, *scancel_args: str) -> None:
        self.cluster.run("scancel", *scancel_args, self.id)


class Campaign:
    """Submits every job at once and drives each in its own thread."""

    def __init__(self, cluster, root: Path, demo_data: Path, tiny_init: Path):
        self.cluster, self.root = cluster, root
        self.demo_data, self.tiny_init = demo_data, tiny_init
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.lock = threading.Lock()

    def submit(self, name: str, steps: int, *sbatch_flags: str, out: Path | None = None, extra: str = "",
               **env) -> Job:
        out = out or self.root / name
        log = self.root / f"{name}.out"
        args = (f"data.source=offline data.seq_length=512 train.steps={steps} train.warmup_steps=1 "
                f"train.eval_interval=0 train.log_interval=1 {extra}").strip()
        client_env = self.cluster.client_env(DATA_DIR=str(self.demo_data), CKPT=str(self.tiny_init),
                                             OUTPUT_DIR=str(out), PYTHON=sys.executable, EXTRA_ARGS=args,
                                             OMP_NUM_THREADS="1", **env)
        client_env.pop("MFT_STOP_FILE", None)
        proc = subprocess.run(["sbatch", "--parsable", f"--job-name=mft-{name}", f"--output={log}", *sbatch_flags,
                               str(SCRIPT)], cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        return Job(self.cluster, name, proc.stdout.strip().split(";")[0], out, log)

    def start(self, fn, *args) -> Future:
        return self.pool.submit(fn, self, *args)


# ------------------------------------------------------------------------------ scenarios
# Each runs in a thread, returns what its test checks, or raises with the job's log.

def completes(c: Campaign) -> dict:
    job = c.submit("complete", STEPS)
    return {"job": job, "final": job.wait_done()}


def usr1_requeue(c: Campaign) -> dict:
    # saves at every step: the stop signal reaches a trainer whose checkpoint writer has a helper
    job = c.submit("usr1", STEPS, extra="train.save_interval=1")
    job.wait_steps(1)
    job.signal("--signal=USR1")
    job.wait("the requeue", lambda: int(job.fields()["Restarts"]) >= 1 or not job.queued())
    return {"job": job, "final": job.wait_done()}


def time_limit(c: Campaign) -> dict:
    """--time=2 --signal=USR1@1, MAX_RESTARTS=1: the warning requeues the job once; a USR1 to the
    requeued run (or its own warning, whichever comes first) ends it without a requeue. Two
    minutes, not one: slurmctld sends the warning up to a minute early, and a start-up on a
    loaded 2-core machine must not reach the limit before its first step."""
    job = c.submit("timelimit", 100000, "--time=2", "--signal=USR1@1", MAX_RESTARTS="1")
    job.wait("the first start", lambda: job.state() != "PENDING")
    first_start = job.fields()["StartTime"]
    job.wait("the requeue", lambda: int(job.fields()["Restarts"]) >= 1 or not job.queued())
    first_steps = job.steps()
    if job.queued():
        job.wait("a step after the resume", lambda: len(job.steps()) > len(first_steps) or not job.queued())
        if job.queued():
            job.signal("--signal=USR1")
    return {"job": job, "final": job.wait_done(), "first_start": first_start, "first_steps": first_steps}


def sigterm(c: Campaign) -> dict:
    job = c.submit("sigterm", STEPS, extra="train.save_interval=1")
    job.wait_steps(1)
    job.signal()  # plain scancel: SIGTERM to every process of the job, SIGKILL after KillWait
    return {"job": job, "final": job.wait_done()}


def _task_pid(job: Job, procid: int) -> int | None:
    """PID of the trainer task SLURM_PROCID=procid of this job, from /proc."""
    want = {f"SLURM_JOB_ID={job.id}".encode(), f"SLURM_PROCID={procid}".encode()}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"megatron_mft.train" not in (proc / "cmdline").read_bytes():
                continue
            if want <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except OSError:
            continue
    return None


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants (the trainer's multiprocessing helpers), parents first."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(proc.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def sigkill_one_task(c: Campaign) -> dict:
    job = c.submit("sigkill", STEPS, extra="train.save_interval=1")
    latest = job.out / "checkpoints" / "latest"
    job.wait("the first checkpoint", lambda: latest.exists() or not job.queued())
    pid = job.wait("rank 1's process", lambda: _task_pid(job, 1) or not job.queued() and -1)
    assert pid > 0 and job.queued(), f"the job ended before a task could be killed\n{job.describe()}"
    # the task with its helper processes: proctrack/linuxproc (no cgroups here) would lose the
    # helpers once they are re-parented to init, and the step would wait a minute for their output
    subprocess.run(["kill", "-KILL", *map(str, _process_tree(pid))], check=True)
    killed_after = job.steps()
    final = job.wait_done()
    saved = latest.read_text().strip()
    # resubmitted with the same OUTPUT_DIR: resumes from the checkpoint the kill left behind
    again = c.submit("sigkill_resubmit", STEPS, out=job.out, extra="train.save_interval=1")
    return {"job": job, "final": final, "killed_after": killed_after, "saved": saved, "again": again,
            "again_final": again.wait_done()}


@pytest.fixture(scope="module")
def campaign(slurm_cluster, demo_data, tiny_init, tmp_path_factory, request):
    """The jobs' args are the reference runs' overrides (data.source=offline, seq 512, 4 steps,
    warmup 1, no evaluation); ``reference``: their losses and torchrun's TP=2 output_dir. The
    jobs are submitted first: the session's reference runs (this module is the suite's first to
    ask for them) run while the jobs queue, wait for signals and requeue, not before them."""
    c = Campaign(slurm_cluster, tmp_path_factory.mktemp("slurm_jobs"), demo_data, tiny_init)
    runs = {fn.__name__: c.start(fn) for fn in (time_limit, completes, usr1_requeue, sigterm, sigkill_one_task)}
    runs["reference"] = Future()
    try:
        runs["reference"].set_result({"losses": request.getfixturevalue("reference_run")[1],
                                      "out": request.getfixturevalue("tp2_sp_run")})
    except Exception as e:  # the tests that compare with it fail with this; the others still run
        runs["reference"].set_exception(e)
    yield runs
    c.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------- checks

def _assert_losses_equal(got: dict, ref: dict, steps) -> None:
    for step in steps:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step


def _logged_once(job: Job, last: int) -> None:
    """metrics.jsonl and the job's console output (both runs) have steps 1..last, each once."""
    assert job.steps() == list(range(1, last + 1)), job.describe()
    console = [int(s) for s in re.findall(r"^step (\d+)/", job.text(), re.M)]
    assert console == list(range(1, last + 1)), job.describe()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_sbatch_runs_tp2_to_completion_as_torchrun(campaign):
    run, ref = campaign["completes"].result(), campaign["reference"].result()
    job, final = run["job"], run["final"]
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "0"), job.describe()
    assert f"job {job.id}: 1 node(s) x 2 task(s) = 2 ranks" in job.text()
    assert "layout tp=2 pp=1" in job.text()
    _logged_once(job, STEPS)
    _assert_losses_equal(train_losses(job.out), ref["losses"], range(1, STEPS + 1))
    assert train_losses(job.out)[STEPS]["loss"] < train_losses(job.out)[1]["loss"]
    final = f"step_{STEPS:07d}"  # torchrun's run saved every step, the job only at the end
    assert sorted(p.name for p in (job.out / "checkpoints").iterdir()) == ["latest", final]
    assert _files(job.out / "checkpoints" / final) == _files(ref["out"] / "checkpoints" / final)
    assert (job.out / "checkpoints" / "latest").read_text().strip() == final


def test_scancel_usr1_saves_requeues_and_the_requeued_job_finishes(campaign):
    run, ref = campaign["usr1_requeue"].result(), campaign["reference"].result()
    job, final, text = run["job"], run["final"], run["job"].text()
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), job.describe()
    stopped = int(re.search(r"stopping at step (\d+): SIGUSR1", text).group(1))
    assert 1 <= stopped < STEPS
    assert f"saved checkpoint {job.out / 'checkpoints' / f'step_{stopped:07d}'}" in text
    assert f"stopped early (SIGUSR1) after saving a checkpoint: requeueing job {job.id}" in text
    assert re.search(rf"resumed from \S+step_{stopped:07d} at step {stopped}\b", text), text
    _logged_once(job, STEPS)
    _assert_losses_equal(train_losses(job.out), ref["losses"], range(1, STEPS + 1))
    assert (job.out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert not list(job.out.glob(".stop_reason.*"))


def _warning_times(cluster, job_id: str) -> list[datetime]:
    log = (cluster.root / "slurmctld.log").read_text(errors="replace")
    return [datetime.fromisoformat(t) for t in
            re.findall(rf"^\[([^\]]+)\] .*?send_job_warn_signal: warning signal 10 to JobId={job_id}\b", log, re.M)]


def test_time_limit_warning_requeues_then_max_restarts_stops(campaign, slurm_cluster):
    run = campaign["time_limit"].result()
    job, final, text = run["job"], run["final"], run["job"].text()
    # the warning came before the first run's limit (2 minutes after its start)
    warned = _warning_times(slurm_cluster, job.id)
    assert warned, f"slurmctld never sent the warning signal\n{job.describe()}"
    limit = datetime.fromisoformat(run["first_start"]).timestamp() + 120
    assert warned[0].timestamp() < limit, (warned[0], run["first_start"])
    # first run: saved and requeued itself
    first = re.search(r"stopping at step (\d+): SIGUSR1", text)
    assert first, job.describe()
    k1 = int(first.group(1))
    assert f"requeueing job {job.id}" in text
    assert re.search(rf"resumed from \S+step_{k1:07d} at step {k1}\b", text), job.describe()
    # second run (SLURM_RESTART_COUNT=1 = MAX_RESTARTS): stopped by USR1, not requeued
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), job.describe()
    assert "not requeueing: SLURM_RESTART_COUNT reached MAX_RESTARTS" in text
    assert text.count("requeueing job") == 1
    last = int(re.findall(r"stopping at step (\d+): SIGUSR1", text)[-1])
    assert last > k1
    _logged_once(job, last)
    assert (job.out / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"


def test_scancel_sigterm_saves_and_does_not_requeue(campaign, slurm_cluster):
    run = campaign["sigterm"].result()
    job, final, text = run["job"], run["final"], run["job"].text()
    assert (final["JobState"], final["Restarts"]) == ("CANCELLED", "0"), job.describe()
    stopped = int(re.search(r"stopping at step (\d+): SIGTERM", text).group(1))
    assert stopped < STEPS
    assert (job.out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert job.steps() == list(range(1, stopped + 1))
    assert "requeueing" not in text
    time.sleep(3)  # a requeue would show as PENDING with Restarts=1 within the requeue delay
    assert not job.queued() and job.fields()["Restarts"] == "0"


def test_sigkill_of_one_task_ends_the_job_and_the_last_checkpoint_loads(campaign):
    run, ref = campaign["sigkill_one_task"].result(), campaign["reference"].result()
    job, final, text = run["job"], run["final"], run["job"].text()
    assert final["JobState"] == "FAILED" and final["Restarts"] == "0", job.describe()
    assert len(run["killed_after"]) < STEPS
    assert _task_pid(job, 0) is None and _task_pid(job, 1) is None  # --kill-on-bad-exit ended rank 0 too
    assert re.search(r"srun: error: \S+: task 1: Killed", text), text
    assert "requeueing" not in text
    saved = int(run["saved"].removeprefix("step_"))
    assert 1 <= saved < STEPS
    again, again_final = run["again"], run["again_final"]
    assert again_final["JobState"] == "COMPLETED", again.describe()
    assert re.search(rf"resumed from \S+step_{saved:07d} at step {saved}\b", again.text()), again.describe()
    _assert_losses_equal(train_losses(job.out), ref["losses"], range(saved + 1, STEPS + 1))
