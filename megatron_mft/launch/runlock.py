"""One run per output_dir: a lock file that names its holder (host, PID, SLURM job).

Two runs writing one output_dir would interleave metrics.jsonl and race on checkpoints. The run
(rank 0) creates ``<output_dir>/.run.lock`` exclusively and removes it on exit. A lock left by a
run that died without cleaning up (SIGKILL, node failure) is stale, and taken over with a note,
when its holder is provably gone: the same host and a PID that no longer runs, or the same
SLURM job id (a requeued job: SLURM ended the earlier incarnation before restarting it). A lock
held by a live run, or by another host that cannot be checked, is refused with a message naming
the holder and the file to delete if that run is really gone.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from megatron_mft.errors import UserError

LOCK_FILE = ".run.lock"


class RunLockError(UserError):
    """Another run holds the output_dir; exit 1."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(holder: dict, me: dict) -> Optional[str]:
    """Why the holder is provably gone, or None."""
    pid, same_host = holder.get("pid"), holder.get("host") == me["host"]
    if same_host and isinstance(pid, int):
        if pid == me.get("pid"):  # a container reuses PIDs: a lock we never took is an earlier process's
            return f"it was left by an earlier process with this PID ({pid})"
        return None if _pid_alive(pid) else f"process {pid} on this host is no longer running"
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"]:
        return f"it belongs to an earlier run of this SLURM job {job} (requeued)"
    return None


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"PID {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started')}"


class RunLock:
    """``RunLock(output_dir).acquire()`` / ``.release()`` (also released at interpreter exit)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False
        self.note: Optional[str] = None  # set when a stale lock was taken over

    def acquire(self) -> "RunLock":
        me = _me()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # vanished or half-written between our calls: try again
                    time.sleep(0.1)
                    holder = self._holder()
                    if holder is None:
                        if self.path.exists() and time.time() - self.path.stat().st_mtime > 10:
                            self.note = f"removed an unreadable stale run lock {self.path}"
                            self.path.unlink(missing_ok=True)
                        continue
                why = _stale(holder, me)
                if why is None:
                    raise RunLockError(
                        f"output_dir {self.path.parent} is in use by another run ({_describe(holder)}): two runs "
                        f"in one output_dir would corrupt its checkpoints and metrics. Wait for it, use another "
                        f"output_dir, or, if that run is gone (e.g. its node died), delete {self.path}.")
                self.note = f"took over the stale run lock {self.path} ({_describe(holder)}): {why}"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise RunLockError(f"could not take the run lock {self.path}: it keeps reappearing")

    def _holder(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
