"""Stop cleanly before SLURM stops us: signals and a wall-clock budget.

SLURM warns a job before its time limit with ``#SBATCH --signal=USR1@300`` (SIGUSR1 to every
task, 300 s ahead) and sends SIGTERM on preemption or ``scancel`` (then SIGKILL after
``KillWait``, often 30 s). :class:`PreemptionGuard` only *records* those signals; the trainer
asks :meth:`PreemptionGuard.should_stop` after each optimizer step and, on a reason, saves a
checkpoint and exits 0. All ranks agree on the answer (a MAX all-reduce of a flag), so every
rank stops after the same step even when the signal reached only some of them or the
exit-duration clock ran out on one rank slightly earlier.

Reasons: ``"SIGUSR1"``, ``"SIGTERM"``, ``"SIGINT"``, ``"exit_duration"``. Once a reason is
returned it stays. SIGINT (Ctrl-C) is handled like SIGTERM: save and exit; a second SIGINT exits
at once (status 130) without saving, leaving the last complete checkpoint as it was.

When ``MFT_STOP_FILE`` is set, rank 0 writes the reason to that file the first time
:meth:`should_stop` returns one. ``run_scripts/common.sh`` reads it after ``srun`` returns and
requeues the job (``scontrol requeue``) for ``SIGUSR1`` and ``exit_duration``: a job that stops
itself before its time limit ends COMPLETED, which ``--requeue`` alone would not restart.
SIGTERM is not requeued by the script: SLURM requeues preempted jobs itself, and a user's
``scancel`` means stop.

Typical use (the trainer)::

    guard = PreemptionGuard(exit_duration_minutes=cfg.train.exit_duration_minutes)  # installs
    for step in ...:
        train_step()
        if reason := guard.should_stop():
            save_checkpoint(); log(f"stopping: {reason}"); break
    guard.uninstall()
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

from megatron_mft.launch.agree import agree, initialised_dist

__all__ = ["PreemptionGuard", "REASONS", "catch_early", "shield_checkpoint_helper"]

#: Reason codes, ordered: the all-reduce MAX picks the highest when ranks disagree.
REASONS = ("exit_duration", "SIGINT", "SIGTERM", "SIGUSR1")
_CODE = {r: i + 1 for i, r in enumerate(REASONS)}


#: Signals recorded by :func:`catch_early` before a guard existed; the next guard adopts them.
_EARLY: list[str] = []


def _early_handler(signum, frame) -> None:
    _EARLY.append(signal.Signals(signum).name)


def catch_early(signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
    """Record these signals from now until a :class:`PreemptionGuard` takes them over.

    SLURM sends the time-limit warning (``--signal=USR1@N``) up to a minute early, and a start-up
    that loads a large checkpoint takes minutes: SIGUSR1's default action would kill the task
    before the guard exists, and the job would fail instead of saving and requeueing. The
    trainer calls this first thing (``megatron_mft.train``); main thread only.
    """
    if threading.current_thread() is threading.main_thread():
        for name in signals:
            signal.signal(getattr(signal, name), _early_handler)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _helper_init(trainer_pid: int | None) -> None:
    """The checkpoint-writer helper's initializer: deaf to the stop signals, and gone with the
    trainer. megatron's helper is a ``multiprocessing`` manager server, shut down by the
    trainer's exit handlers; a trainer killed outright (SIGKILL, the OOM killer) runs none, and
    the helper, which ignores SIGTERM, lived on for ever holding its memory (seen: four such
    orphans after one test-suite run). On Linux the kernel now sends it SIGKILL when the
    trainer's thread that started it ends: asked only when that thread is the main thread
    (``trainer_pid`` given), as a worker thread's end would take the helper from a live trainer."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # pending ones are discarded (ignored)
    if trainer_pid is None:
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the exit handlers remain the only shutdown
        return
    if os.getppid() != trainer_pid:  # the trainer died before the request above
        os._exit(0)


def shield_checkpoint_helper() -> None:
    """Start megatron's checkpoint-writer helper now, deaf to the stop signals.

    From its first save on, megatron's dist-checkpoint writer keeps one helper process per
    rank (a ``multiprocessing`` manager that collects write results). SLURM signals every
    process of a step (``--signal``, ``scancel``, preemption), helpers included: with the default
    actions the helper died, and the save that the signal asked for failed (broken pipe) or hung.
    Started here with those signals ignored, only the trainer acts on them, and gone with the
    trainer (``_helper_init``). The trainer calls this at start-up (``megatron_mft.train``) and
    ``save_checkpoint`` before every save (convert, direct saves); a no-op once the helper exists.
    """
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:  # megatron creates it lazily
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        # the helper is born with the stop signals blocked (the mask survives fork and exec): one
        # that came before its initializer ignored them killed it, and start() failed (EOFError;
        # CI: SLURM's time-limit warning during a requeued job's start-up). Ours wait until after.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            main = threading.current_thread() is threading.main_thread()
            manager.start(initializer=_helper_init, initargs=(os.getpid() if main else None,))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


class PreemptionGuard:
    """Record SIGTERM / SIGUSR1 and a wall-clock budget; answer "should we stop now?".

    ``exit_duration_minutes``: stop once this many minutes have passed since ``start_time``
    (default: construction time); 0 or None disables it. ``signals``: names to catch.
    ``install``: install the handlers now (default); else call :meth:`install` later.
    ``stop_file``: where rank 0 writes the reason (default: ``$MFT_STOP_FILE``, if set).
    """

    def __init__(self, exit_duration_minutes: float | None = 0.0,
                 signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT"),
                 start_time: float | None = None, stop_file: str | None = None, install: bool = True):
        self.exit_duration_minutes = float(exit_duration_minutes or 0.0)
        self.signal_names = tuple(signals)
        self.start_time = time.monotonic() if start_time is None else start_time
        self.stop_file = stop_file if stop_file is not None else os.environ.get("MFT_STOP_FILE") or None
        self._received: list[str] = []
        self._previous: dict[int, object] = {}
        self._reason: str | None = None
        if install:
            self.install()

    # --------------------------------------------------------------------------- handlers

    def _handler(self, signum, frame) -> None:  # keep trivial: no raising
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in self._received:  # the user insists: stop now, save nothing
            os.write(2, b"second SIGINT: exiting now without saving; the last complete checkpoint is kept\n")
            os._exit(130)
        self._received.append(name)

    def install(self) -> "PreemptionGuard":
        """Install the handlers (idempotent; main thread only, elsewhere warns and records nothing)."""
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionGuard.install: not the main thread; signals will not be caught")
            return self
        for name in self.signal_names:
            sig = getattr(signal, name, None)
            if sig is not None and sig not in self._previous:
                # after catch_early, uninstall leaves the signal ignored, not fatal: a second SIGUSR1
                # during the teardown after a stop (SLURM's warning after an scancel) must not kill
                # the task, nor be kept for a next run in this process (catch_early re-arms)
                previous = signal.signal(sig, self._handler)
                self._previous[sig] = signal.SIG_IGN if previous is _early_handler else previous
        self._received.extend(_EARLY)  # signals that came before the guard (catch_early)
        _EARLY.clear()
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---------------------------------------------------------------------------- queries

    @property
    def received(self) -> str | None:
        """The first signal recorded on this rank (no communication)."""
        return self._received[0] if self._received else None

    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.start_time) / 60.0

    def local_reason(self) -> str | None:
        """This rank's reason, without asking the others."""
        if self._received:
            return max(self._received, key=_CODE.get)
        if self.exit_duration_minutes > 0 and self.elapsed_minutes() >= self.exit_duration_minutes:
            return "exit_duration"
        return None

    def should_stop(self, group=None) -> str | None:
        """The reason to stop now, the same on every rank of ``group``; None to go on.

        Collective when ``torch.distributed`` is initialised: every rank of ``group``
        (default: the world) must call it at the same point.
        """
        if self._reason is not None:
            return self._reason
        code = _CODE.get(self.local_reason(), 0)
        code = agree(code, "max", group)
        if code:
            self._reason = REASONS[code - 1]
            self._write_stop_file()
        return self._reason

    def _write_stop_file(self) -> None:
        if not self.stop_file or _rank() != 0:
            return
        try:
            with open(self.stop_file, "w") as f:
                f.write(self._reason + "\n")
        except OSError as e:  # never let bookkeeping break the checkpoint that follows
            warnings.warn(f"PreemptionGuard: cannot write MFT_STOP_FILE {self.stop_file}: {e}")


def _rank() -> int:
    dist = initialised_dist()
    return dist.get_rank() if dist is not None else 0
