"""One error convention for every command (train, checkpoint init, convert, evaluate, plot, preprocess).

Code that finds a problem the user can fix raises :class:`UserError` (runtime, exit 1) or
:class:`UsageError` (bad arguments or config, exit 2) with a message that names the file, line,
key or path. Each command's ``main`` is wrapped by :func:`command`, which prints that message as
``error: ...`` and returns the exit code instead of showing a traceback. Any other exception is an
internal error: one paragraph with its type and message, exit 1, and a hint to rerun with the
traceback. ``--debug`` anywhere on a command line (removed before the command parses it) or
``MFT_DEBUG=1`` in the environment shows the traceback too.

Under torchrun/srun every rank runs the same checks: a usage/config error is printed by rank 0
and by the first rank of every other node (file checks can differ between nodes: a missing
mount), not by the rest (they would print the same words), while runtime and internal errors, which may
differ between ranks, are printed by every rank that hits them, prefixed ``[rank N]``. Every rank
exits non-zero either way. (torchrun itself then adds its ChildFailedError summary, with a traceback
of the launcher process and the ranks' exit codes, and exits 1: that part is torch's.)

Out of memory (torch's GPU or host allocator) is not a bug: commands that can run out turn it into
a UserError with :func:`out_of_memory_text` (where, torch's figures, their own settings to lower).

This module imports nothing from the package, so every layer may raise these errors.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback
from typing import Callable

__all__ = ["ArgumentParser", "HELP", "RUNTIME", "USAGE", "UsageError", "UserError", "command", "debug_enabled",
           "is_out_of_memory", "out_of_memory_device", "out_of_memory_text", "report"]

#: exit codes
USAGE, RUNTIME = 2, 1
DEBUG_FLAG, DEBUG_ENV = "--debug", "MFT_DEBUG"
_HINT = f"rerun with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the traceback"
#: argparse epilog of every command
HELP = (f"Errors print one message and exit 2 (arguments, config) or 1 (run time); {DEBUG_FLAG} or "
        f"{DEBUG_ENV}=1 adds the traceback.")


class UserError(Exception):
    """A problem the user can fix at run time (a missing, damaged or unwritable file...); exit 1.
    ``str(error)`` is the whole message."""

    exit_code = RUNTIME

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(UserError):
    """Bad command-line arguments or config values; exit 2. Found alike on every rank of a node."""

    exit_code = USAGE


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's variables, without importing the launch layer."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        try:
            return int(os.environ[rank_var]), int(os.environ[world_var])
        except (KeyError, ValueError):
            continue
    return 0, 1


#: how long a rank that leaves a usage error to its node's first rank waits before it exits: torchrun
#: stops every rank as soon as one exits, and the first rank must have printed the message by then
SILENT_RANK_GRACE_S = 3.0


def _leave_it_to_the_first_rank() -> None:
    time.sleep(SILENT_RANK_GRACE_S)


def first_rank() -> bool:
    """Whether this process is the job's first rank (or not launched by torchrun/srun), from the
    launcher's variables: the one that prints what every rank would print alike (config warnings)."""
    return _rank()[0] == 0


def _rank_failures(error: BaseException) -> list[BaseException]:
    """The exceptions of the ranks that failed, for one that carries them (torch.distributed.checkpoint's
    CheckpointException: ``failures = {rank: (exception, traceback)}``); else none."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return []
    inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return [e for e in inner if isinstance(e, BaseException)]


def _cause(error: BaseException) -> BaseException:
    """The exception behind one that carries the failures of several ranks: the first rank's."""
    failures = _rank_failures(error)
    return _cause(failures[0]) if failures else error


def _text(error: BaseException) -> str:
    """The exception's message without the tracebacks some libraries paste into it."""
    text = str(error).split("Traceback (most recent call last)")[0].strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def report(error: BaseException) -> int:
    """Print ``error`` by the convention above (to stderr) and return its exit code."""
    rank, world = _rank()
    debug = debug_enabled()
    if debug:
        sys.stdout.flush()
        traceback.print_exception(error, file=sys.stderr)
    error = _cause(error)
    if isinstance(error, UserError):
        code = error.exit_code
        text = f"error: {error}"
        if isinstance(error, UsageError) and rank != 0 and os.environ.get("LOCAL_RANK", "0") != "0" and not debug:
            _leave_it_to_the_first_rank()  # the first rank of each node prints it (file checks can differ
            return code                      # between nodes)
    elif isinstance(error, KeyboardInterrupt):
        code, text = 130, "interrupted"
    elif isinstance(error, OSError):  # a file system or network failure, e.g. no space left on device
        code, text = RUNTIME, f"error: {error}" + ("" if debug else f" ({_HINT})")
    else:
        code = RUNTIME
        text = (f"internal error: {_text(error)}. This is a bug or a case without a proper message yet"
                + ("" if debug else f"; {_HINT}") + ".")
    if world > 1 and (rank != 0 or not isinstance(error, UsageError)):  # usage errors: rank 0 unprefixed
        text = "\n".join(f"[rank {rank}] {line}" for line in text.splitlines())
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)
    return code


# ---------------------------------------------------------------- out of memory
#: torch's failed host allocation (a RuntimeError, not torch.OutOfMemoryError)
_HOST_OOM = "DefaultCPUAllocator: can't allocate memory"


#: RuntimeErrors of allocations that failed: torch's CPU allocator, the CUDA runtime (NCCL, CUDA
#: calls outside the caching allocator), cuBLAS' workspace; and the caching allocator's own text
#: as it reaches us wrapped (megatron's checkpoint writer: "Worker failure: ...")
_OOM_TEXTS = (_HOST_OOM, "CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _out_of_memory_error(error: BaseException) -> BaseException | None:
    """The out-of-memory error in ``error`` or in what it wraps (``__cause__``/``__context__``, every
    rank's failure of a distributed checkpoint), or None; each exception looked at once (cycles).
    torch is not imported for it: without torch loaded, no torch error exists."""
    torch = sys.modules.get("torch")
    classes = tuple(c for c in (getattr(torch, "OutOfMemoryError", None),
                                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if c is not None)
    todo, seen = [error], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (classes and isinstance(e, classes)) or (isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXTS)):
            return e
        todo += [*_rank_failures(e), e.__cause__, e.__context__]
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """torch ran out of GPU memory (torch.OutOfMemoryError, a CUDA/cuBLAS allocation error) or of host
    memory (its CPU allocator's RuntimeError), here or in what ``error`` wraps."""
    return _out_of_memory_error(error) is not None


def _torch_figures(error: BaseException) -> str:
    """torch's own sentences (what it tried to allocate, the device's capacity and use), without its
    pointer to the documentation and the C++ location of a host failure."""
    text = " ".join(str(error).split())
    text = text.split(" See documentation for Memory Management")[0]
    for start in (_HOST_OOM, "CUDA out of memory"):
        if start in text:
            text = text[text.index(start):]
            break
    return text.rstrip(". ") + "."


def out_of_memory_device(error: BaseException) -> str:
    """"host" or "GPU": which memory the out-of-memory ``error`` ran out of."""
    return "host" if _HOST_OOM in str(_out_of_memory_error(error) or error) else "GPU"


def out_of_memory_text(error: BaseException, where: str, hints: list[str], doc: str) -> str:
    """One message for any command: what ran out and where, torch's figures, then ``hints``."""
    inner = _out_of_memory_error(error) or error
    device = out_of_memory_device(inner)
    lines = "\n".join(f"  - {h}" for h in hints)
    return f"out of {device} memory during {where}: {_torch_figures(inner)}\nTo lower peak memory ({doc}):\n{lines}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (unknown option, missing argument) are printed by the
    job's first rank only: under torchrun/srun every rank parses the same command line, and N
    copies of one message would follow. Every rank still exits 2. Every command builds its
    parser from this class. ``--debug`` is listed among its options; the command wrapper takes it
    off the command line before parsing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument(DEBUG_FLAG, action="store_true",
                              help=f"on an error, print the traceback too (or set {DEBUG_ENV}=1)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if getattr(parsed, "debug", False):  # an abbreviation (--deb) that the wrapper did not take off
            os.environ[DEBUG_ENV] = "1"
        return parsed, rest

    def error(self, message: str):
        if _rank()[0] == 0 or debug_enabled():
            super().error(message)  # prints the usage and the message, exits 2
        _leave_it_to_the_first_rank()
        self.exit(USAGE)


def command(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main(argv) -> exit code``: ``--debug`` is taken off ``argv`` (and sets
    ``MFT_DEBUG=1``, so processes the command starts inherit it); errors become messages."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        if argv is None and DEBUG_FLAG in sys.argv:  # a main that parses sys.argv itself (the benches) never sees it
            sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
            os.environ[DEBUG_ENV] = "1"
        argv = list(sys.argv[1:] if argv is None else argv)
        if DEBUG_FLAG in argv:
            argv = [a for a in argv if a != DEBUG_FLAG]
            os.environ[DEBUG_ENV] = "1"
        try:
            return main(argv)
        except SystemExit:  # argparse's usage errors (ArgumentParser above) and --help print themselves
            raise
        except BaseException as error:  # noqa: BLE001 - the one place every error is turned into a message
            return report(error)

    return wrapped
