"""File-system steps that make replacing a folder safe: the atomic exchange, fsync, a write probe,
where a path that does not exist yet would be created (and which folders creating it made), whether
one path lies within another, where a broken symbolic link points (:func:`broken_link`: the data
folders' file discovery). Used by the checkpoint publish (checkpoint/dist.py), the preprocessing
output swap (data/outdir.py), the preflight checks (training/preflight.py), the trainer's
output_dir (training/recipe.py), the tools' output checks (convert, evaluate), and every file
replaced whole (:func:`replace_file_atomically`: checkpoints' ``latest``, the resolved config,
metrics.jsonl at a resume, the DPO reference, evaluate's and plot's results)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the C library
    or the file system cannot (the caller then renames in two steps)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(top: Path) -> None:
    """Make every file and folder under ``top`` durable (before publishing it by a rename)."""
    for dirpath, _, files in os.walk(top):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def cannot_write_in(folder: Path) -> Optional[str]:
    """Why nothing can be created in ``folder`` (strerror), or None: a probe folder, removed at once."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mft_write_probe.", dir=folder))
    except OSError as e:
        return str(e.strerror or e)
    return None


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or its nearest ancestor that exists (where creating ``path`` starts)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the folders this call created, outermost first (one
    made meanwhile by another process is not among them), so a caller removes exactly its own. A
    part that exists but is not a folder (a file, a dangling link) raises NotADirectoryError; on
    any failure the folders this call made are removed again."""
    path = Path(path).absolute()
    made, at = [], nearest_existing(path)
    try:
        for part in path.relative_to(at).parts:
            at = at / part
            try:
                at.mkdir()
            except FileExistsError:
                if not at.is_dir():
                    why = broken_link(at) or "not a folder"
                    raise NotADirectoryError(errno.ENOTDIR, f"cannot create folder {path}: {at} is {why}") from None
                continue
            made.append(at)
    except BaseException:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return made


def is_within(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or lies below it (``~`` and symlinks resolved; neither need exist)."""
    try:
        Path(child).expanduser().resolve().relative_to(Path(parent).expanduser().resolve())
    except (ValueError, OSError):
        return False
    return True


def broken_link(path: str | Path) -> Optional[str]:
    """What is wrong with ``path`` if it is a symbolic link that leads nowhere ("symbolic link to
    T, which does not exist"), else None. ``is_file()`` / ``is_dir()`` are False for such a link, so
    a listing that filters with them would drop the file the user linked in without a word."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
        return None
    except OSError as e:
        reason = "which does not exist" if e.errno == errno.ENOENT else f"which cannot be reached ({e.strerror})"
    try:
        target = os.readlink(path)
    except OSError:  # removed in between
        return None
    if not os.path.isabs(target):
        target = f"{target} ({os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), target))})"
    return f"symbolic link to {target}, {reason}"


def replace_file_atomically(out: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a new hidden file beside ``out`` (created exclusively, never over an
    existing file), which is made durable and then renamed over ``out``: a failed or interrupted
    write, or a crash, leaves the old ``out`` whole and no temporary behind. The new file keeps the
    old one's permissions. A temporary left by a killed writer never blocks a later one (its name
    is new each time).

    A symbolic link ``out`` is itself replaced by the new file, and what it pointed to is left as it
    was: a run folder copied as links (``cp -as``) must not rewrite the original run's ``latest``,
    ``config.yaml`` or ``metrics.jsonl``; the link's target is never written, nor its folder made."""
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(out))
    # the extension kept: writers read the format from it
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=f".tmp{ext}", dir=d)
    os.close(fd)
    try:
        try:  # the replaced file's permissions (not a link target's: perhaps another user's file)
            mode = stat.S_IMODE(os.lstat(out).st_mode) & 0o777 if not os.path.islink(out) else None
        except OSError:
            mode = None
        if mode is None:  # a new file, or a link: what open() would give a new file
            mode = 0o666 & ~_umask()
        write(tmp)
        os.chmod(tmp, mode)  # after the write: a read-only (0444) file is still replaced
        fsync_path(Path(tmp))
        os.replace(tmp, out)
        fsync_path(Path(d))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    """The process's umask, read without setting it where Linux tells it (setting it briefly would
    race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
