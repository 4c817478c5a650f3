"""Raw task folders -> tokenized samples, with every bad line accounted for.

Shared by offline preprocessing and online mode. The main process finds line boundaries and
hands out byte ranges of whole lines; ``workers`` processes read, parse, validate and tokenize
them, and the chunks come back in order, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Literal

import numpy as np

from megatron_mft.data.records import DataError, Reason, RecordError, parse_line
from megatron_mft.data.taskdir import TaskFiles
from megatron_mft.data.template import ChatFormatter, ChatTemplate, Mode
from megatron_mft.data.tokenizer import load_tokenizer

Overlong = Literal["error", "drop", "truncate"]
#: Stop reading after this many errors: enough to see the pattern, not a wall of text.
MAX_ERRORS = 50
#: Default byte limit of one line: far above any real sample, far below what a stray multi-GB
#: line would cost to parse and tokenize (tens of times its size in memory).
MAX_LINE_BYTES = 64 << 20
_CHUNK_LINES = 512
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a worker process needs; small and picklable."""

    tokenizer: str
    template: ChatTemplate
    seq_length: int
    mode: Mode = "sft"
    overlong: Overlong = "error"
    #: a longer line (bytes, without its newline) is rejected as ``line_too_long`` without being read
    max_line_bytes: int = MAX_LINE_BYTES


@dataclass
class Issue:
    """A line that did not become a sample as written. ``action``: error | rejected | dropped."""

    file: str
    line: int
    reason: str
    detail: str
    action: str
    raw: str = ""

    def message(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.detail}"

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason, "detail": self.detail,
                "action": self.action, "raw": self.raw}


@dataclass
class TaskCounts:
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    dropped: int = 0
    truncated: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class EncodedTask:
    files: TaskFiles
    #: samples from training files / from validation files, in file and line order.
    train: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    val: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    counts: TaskCounts = field(default_factory=TaskCounts)


@dataclass
class Encoded:
    tasks: list[EncodedTask]
    issues: list[Issue]
    marker_ids: dict[str, list[int]]
    #: the chat template's name, and per input file the samples whose system turn it dropped
    template: str = ""
    system_dropped: dict[str, int] = field(default_factory=dict)
    #: special tokens of the template that the tokenizer encodes as text (ChatFormatter.split_specials)
    split_specials: list[str] = field(default_factory=list)


# --- worker side -------------------------------------------------------------------------
_FORMATTER: ChatFormatter | None = None
_SPEC: EncodeSpec | None = None


def _init_worker(spec: EncodeSpec, formatter: ChatFormatter | None = None) -> None:
    """``formatter``: the main process's, handed to forked workers as it is (building one
    compiles the protection patterns: tens of ms per process for Llama-3's 256 special tokens)."""
    global _FORMATTER, _SPEC
    _SPEC = spec
    _FORMATTER = formatter or ChatFormatter(spec.template, load_tokenizer(spec.tokenizer), spec.mode)


def _chunk_lines(path: str, first_line: int, start: int, end: int) -> list[tuple[int, bytes]]:
    """The lines of a byte range of ``path`` (read by the worker: no raw text is pickled)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        raise DataError([f"{path}: cannot read ({e.strerror or e})"]) from None
    if start == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.endswith(b"\n"):
        data = data[:-1]
    return [(i, raw[:-1] if raw.endswith(b"\r") else raw)
            for i, raw in enumerate(data.split(b"\n"), start=first_line)]


def _encode_chunk(chunk: tuple[int, str, str, int, int, int, int]):
    """-> (task, split, file, bytes read, packed, kept, bad). A chunk is a run of whole lines, or
    (``too_long`` > 0) one line of that many bytes over the limit, which is not read at all.
    The chunk's samples come back as two
    flat arrays, ids and loss mask, in compact form (``packed``, see :func:`_pack_arrays`);
    ``kept`` = (starts, ends, loss tokens) arrays of the kept samples' slices of them, in line
    order (loss tokens negated when the sample was truncated); ``bad`` = ``(line, reason,
    detail, dropped, raw text)`` for lines that are not samples (``dropped``: by ``--overlong
    drop``, else an error or, with ``--skip-bad-samples``, a rejection)."""
    task, split, path, first_line, start, end, too_long = chunk
    assert _FORMATTER is not None and _SPEC is not None
    if too_long:
        none = np.zeros(0, np.int64)
        detail = f"{too_long} bytes > --max-line-bytes / data.max_line_bytes {_SPEC.max_line_bytes}; not read"
        return (task, split, path, end - start, _pack_arrays(np.zeros(0, np.int32), np.zeros(0, np.uint8), 0),
                (none, none, none), [(first_line, Reason.LINE_TOO_LONG.value, detail, False, "")])
    good, bad = [], []
    for line_no, raw in _chunk_lines(path, first_line, start, end):
        try:
            rec = parse_line(raw)
            if rec is not None:
                _FORMATTER.check_record(rec)
        except RecordError as e:
            bad.append((line_no, e.reason.value, e.detail, False, _text(raw)))
            continue
        if rec is not None:
            good.append((line_no, rec, raw))
    ids, mask, bounds = _FORMATTER.encode_flat([r for _, r, _ in good])
    seq = _SPEC.seq_length
    b_arr = np.asarray(bounds, dtype=np.int64)
    starts, ends = b_arr[:-1], np.minimum(b_arr[1:], b_arr[:-1] + seq)  # ends once truncated
    cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    loss = cum[ends] - cum[starts]  # loss tokens of each (truncated) sample
    keep = (b_arr[1:] - starts) <= seq
    if not keep.all():
        for i in np.flatnonzero(~keep).tolist():
            line_no, _, raw = good[i]
            n = int(b_arr[i + 1] - starts[i])
            if _SPEC.overlong == "error":
                bad.append((line_no, Reason.OVERLONG.value, f"{n} tokens > seq_length {seq}", False, _text(raw)))
            elif _SPEC.overlong == "drop":
                bad.append((line_no, Reason.OVERLONG.value, f"{n} tokens > seq_length {seq}", True, _text(raw)))
            elif loss[i]:
                keep[i] = True
                loss[i] = -loss[i]  # negative: truncated
            else:
                bad.append((line_no, Reason.OVERLONG.value, "no loss-taking token left after truncation", True,
                            _text(raw)))
        bad.sort(key=lambda x: x[0])
    packed = _pack_arrays(ids, mask, _FORMATTER.tok.vocab_size)
    return task, split, path, end - start, packed, (starts[keep], ends[keep], loss[keep]), bad


def _with_template_notes(encode_chunk: Callable, chunk):
    """``encode_chunk``'s result, then how many of the chunk's samples lost their system turn to
    the template (counted by the worker's formatter; any chunk encoder that uses it)."""
    assert _FORMATTER is not None
    _FORMATTER.take_system_dropped()
    return (*encode_chunk(chunk), _FORMATTER.take_system_dropped())


def _text(raw: bytes) -> str:
    """A bad line as the parser saw it, for the error message and rejected.jsonl."""
    return raw.decode("utf-8", errors="replace")


def _pack_arrays(ids: np.ndarray, mask: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Compact form for the trip back to the main process: ids as uint16 when the vocabulary
    allows, the 0/1 mask as bits. Less than half the bytes through the result pipe, whose
    copies and wake-ups otherwise cost the main process more than its own work."""
    small = vocab_size <= np.iinfo(np.uint16).max + 1
    return (ids.astype(np.uint16) if small else ids), np.packbits(mask), len(mask)


def _unpack_arrays(packed: tuple[np.ndarray, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    ids, bits, n = packed
    return ids.astype(np.int32, copy=False), np.unpackbits(bits, count=n)


# --- main side ---------------------------------------------------------------------------
def _line_ends(path: str, block: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Byte offset one past each line of ``path`` (the last line may lack its newline) and each
    line's length without its newline, found block by block: memory stays at one block plus
    16 bytes per line, whatever the file or line size."""
    ends, size = [], 0
    try:
        with open(path, "rb") as f:
            while data := f.read(block):
                ends.append(np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + (size + 1))
                size += len(data)
    except OSError as e:
        raise DataError([f"{path}: cannot read ({e.strerror or e})"]) from None
    line_ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    lengths = np.diff(line_ends, prepend=0) - 1
    if not len(line_ends) or line_ends[-1] != size:
        lengths = np.append(lengths, size - (line_ends[-1] if len(line_ends) else 0))
        line_ends = np.append(line_ends, size)
    return line_ends, lengths


def _chunks(tasks: list[TaskFiles], max_line_bytes: int) -> Iterator[tuple[int, str, str, int, int, int, int]]:
    """(task, split, file, first line number, byte start, byte end, too_long) of runs of whole
    lines: the main process only finds line boundaries; workers read and parse the bytes
    themselves. A line over ``max_line_bytes`` is a chunk of its own with ``too_long`` = its
    length, which no worker reads."""
    for t_idx, t in enumerate(tasks):
        for split, files in (("train", t.train), ("val", t.val)):
            for path in files:
                line_ends, lengths = _line_ends(path)
                long_lines = np.flatnonzero(lengths > max_line_bytes).tolist() + [len(line_ends)]
                k = 0  # next long line
                first = 0  # index of the chunk's first line
                while first < len(line_ends):
                    start = int(line_ends[first - 1]) if first else 0
                    if first == long_lines[k]:
                        yield t_idx, split, path, first + 1, start, int(line_ends[first]), int(lengths[first])
                        first, k = first + 1, k + 1
                        continue
                    last = min(first + _CHUNK_LINES, long_lines[k])
                    # fewer lines if they exceed the byte budget, but always at least one
                    last = max(first + 1, min(last, int(np.searchsorted(line_ends, start + _CHUNK_BYTES, "right"))))
                    yield t_idx, split, path, first + 1, start, int(line_ends[last - 1]), 0
                    first = last


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise DataError([f"{path}: cannot read ({e.strerror or e})"]) from None


def usable_workers(requested: int) -> int:
    """Worker processes to start for ``requested``: at most one per CPU this process may run on
    (its affinity: a SLURM allocation, a container's limit). A pool of 100,000 processes was
    killed by the kernel for memory, with no message."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        cpus = os.cpu_count() or 1
    return max(1, min(requested, cpus))


def encode_tasks(
    tasks: list[TaskFiles],
    spec: EncodeSpec,
    *,
    workers: int = 1,
    skip_bad_samples: bool = False,
    progress: bool = False,
    encode_chunk: Callable = _encode_chunk,
) -> Encoded:
    """Tokenize every task; raise ``DataError`` naming each bad ``file:line`` unless skipping.

    Workers start with ``fork`` where it exists, as torch's DataLoader workers do (they run only
    the tokenizer and numpy), else ``spawn``. ``encode_chunk``: a module-level function with
    ``_encode_chunk``'s contract (preference pairs: ``data.preference.encode_pair_chunk``).
    """
    workers = usable_workers(workers)
    out = [EncodedTask(t) for t in tasks]
    issues: list[Issue] = []
    system_dropped: dict[str, int] = {}
    run_chunk = partial(_with_template_notes, encode_chunk)
    errors = 0
    total_bytes = sum(_size(f) for t in tasks for f in t.train + t.val)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", mininterval=0.5)
    pool = None
    formatter = ChatFormatter(spec.template, load_tokenizer(spec.tokenizer), spec.mode)
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        # Freeze the parent's objects before forking: the workers' garbage collector then never
        # walks (and copy-on-write copies) the parent's heap, e.g. a trainer's torch modules.
        gc.freeze()
        try:
            pool = mp.get_context(method).Pool(workers, initializer=_init_worker,
                                               initargs=(spec, formatter if method == "fork" else None))
        finally:
            gc.unfreeze()
        results = pool.imap(run_chunk, _chunks(tasks, spec.max_line_bytes), chunksize=1)
    else:
        _init_worker(spec, formatter)
        results = map(run_chunk, _chunks(tasks, spec.max_line_bytes))
    try:
        for t_idx, split, path, nbytes, packed, (starts, ends, loss), bad, lost_system in results:
            if lost_system:
                system_dropped[path] = system_dropped.get(path, 0) + lost_system
            flat_ids, flat_mask = _unpack_arrays(packed)
            task = out[t_idx]
            c = task.counts
            dest = task.train if split == "train" else task.val
            dest += [(flat_ids[a:b], flat_mask[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]
            c.samples += len(starts)
            c.tokens += int((ends - starts).sum())
            c.loss_tokens += int(np.abs(loss).sum())
            c.truncated += int((loss < 0).sum())
            for line_no, reason, detail, dropped, raw in bad:
                if dropped:
                    c.dropped += 1
                    issues.append(Issue(path, line_no, reason, detail, "dropped", raw))
                elif skip_bad_samples:
                    c.rejected += 1
                    c.reasons[reason] = c.reasons.get(reason, 0) + 1
                    issues.append(Issue(path, line_no, reason, detail, "rejected", raw))
                else:
                    errors += 1
                    issues.append(Issue(path, line_no, reason, detail, "error", raw))
            if bar is not None:
                bar.update(min(nbytes, total_bytes - bar.n))
            if errors >= MAX_ERRORS:
                break
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    if errors:
        msgs = [i.message() for i in issues if i.action == "error"][:MAX_ERRORS]
        shown = f" (the first {MAX_ERRORS} shown)" if errors > MAX_ERRORS else ""
        more = f"; reading stopped at {MAX_ERRORS} errors, so there may be more" if errors >= MAX_ERRORS else ""
        raise DataError(
            msgs + ([f"{errors} bad line(s){shown}{more}; fix them, or pass --skip-bad-samples to skip and log them"])
        )
    return Encoded(out, issues, formatter.marker_ids, spec.template.name, system_dropped, formatter.split_specials())


def task_warnings(encoded: Encoded) -> list[str]:
    """Tasks that will not train as the data folder suggests: no samples at all (an empty file,
    every line skipped or dropped), or names equal but for case (they collide on case-insensitive
    file systems and are easily confused in metrics); and, once per input file, samples whose
    system turn the template dropped. Warnings, not errors: the other tasks train."""
    out = []
    by_folded: dict[str, list[str]] = {}
    for t in encoded.tasks:
        by_folded.setdefault(t.files.name.casefold(), []).append(t.files.name)
        c = t.counts
        if c.samples == 0:
            lost = ", ".join(f"{n} {what}" for n, what in ((c.rejected, "rejected"), (c.dropped, "dropped")) if n)
            out.append(f"task {t.files.name!r}: 0 samples ({lost or 'its files hold no lines'}); "
                       f"it takes no part in training or validation")
    for names in by_folded.values():
        if len(names) > 1:
            out.append(f"tasks {', '.join(map(repr, names))} differ only in case: they collide on case-insensitive "
                       f"file systems and in metric names read by people; rename one")
    for path, n in encoded.system_dropped.items():
        out.append(f"{path}: template {encoded.template} dropped the system turn of {n} sample(s), as its "
                   f"official chat template does for every conversation that ends with an answer; to train on "
                   f"the system prompts, use a template that keeps system turns (e.g. llama3.1, qwen2, "
                   f"mftcoder) or fold each system prompt into its first user turn")
    if encoded.split_specials:
        out.append(f"template {encoded.template}: the tokenizer has no single token for "
                   f"{', '.join(encoded.split_specials)}; they are encoded as plain text (several tokens each), "
                   f"unlike the family's own tokenizer, so the model learns its turn boundaries as text. Use the "
                   f"family's tokenizer with this template, or a template made for this tokenizer (e.g. mftcoder)")
    return out
