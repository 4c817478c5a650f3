"""Preference pairs: raw ``{"chosen": [...], "rejected": [...]}`` lines -> packed adjacent samples.

Line format (MFTCoder's xxpo data): ``chosen`` and ``rejected`` are chat-round lists in the
``chat_rounds`` form (roles system/human/bot or system/user/assistant), identical except the last
turn, which is the assistant's answer on each side. Each side is validated as strictly as an SFT
line, and the pair must share its prompt, or the line is rejected with a reason.

Layout contract (what megatron_mft.loss.preference relies on): a pair is two samples, chosen
then rejected, adjacent in one pack; packs hold whole pairs only, so in any micro batch sample
id ``2k`` is a chosen and ``2k+1`` its rejected response. The loss mask covers only the last
assistant turn (its content and end of turn): a sequence log-prob is that turn's. Packing works
on pair lengths (a pair never spans two rows); the stored folder is the SFT format
(FORMAT.md section 3) with ``manifest.mode = "preference"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from megatron_mft.data import encode
from megatron_mft.data.collate import EMPTY_ROW, Row
from megatron_mft.data.encode import EncodeSpec, Issue, TaskCounts
from megatron_mft.data.packing import pack
from megatron_mft.data.plan import SplitPlan, held_out
from megatron_mft.data.records import _BLANK, Reason, Record, RecordError, _chat, _loads
from megatron_mft.data.taskdir import TaskFiles
from megatron_mft.data.template import ChatFormatter

Side = tuple[np.ndarray, np.ndarray]  # (ids, loss mask)
Pair = tuple[Side, Side]


class PairReason(str, Enum):
    #: no "chosen"/"rejected" list
    NOT_A_PAIR = "not_a_pair"
    #: the two sides differ before their last turn
    PROMPT_MISMATCH = "prompt_mismatch"
    #: a side's last turn is not the assistant's
    LAST_TURN_NOT_BOT = "last_turn_not_bot"
    #: a side is a lone assistant turn
    NO_PROMPT = "no_prompt"
    #: chosen and rejected answers are the same text (nothing to prefer)
    IDENTICAL = "identical_answers"


def parse_pair(raw: bytes) -> tuple[Record, Record] | None:
    """One raw line -> (chosen, rejected) records; None for a blank line; RecordError otherwise."""
    obj = _loads(raw)
    if obj is _BLANK:
        return None
    if not isinstance(obj, dict):
        raise RecordError(Reason.WRONG_TYPE, f"line must be a JSON object, got {type(obj).__name__}")
    sides = []
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise RecordError(PairReason.NOT_A_PAIR, f"no {key!r} key (keys: {', '.join(map(str, obj))})")
        try:
            rec = _chat({"chat_rounds": obj[key]})
        except RecordError as e:
            raise RecordError(e.reason, f"{key}: {e.detail.replace('chat_rounds', key)}") from None
        if rec.turns[-1].role != "bot":
            raise RecordError(PairReason.LAST_TURN_NOT_BOT, f"{key}: the last turn must be the assistant's answer")
        if len(rec.turns) < 2:
            raise RecordError(PairReason.NO_PROMPT, f"{key}: no prompt turn before the answer")
        sides.append(rec)
    c, r = sides
    if c.turns[:-1] != r.turns[:-1]:
        k = next((i for i, (a, b) in enumerate(zip(c.turns[:-1], r.turns[:-1])) if a != b),
                 min(len(c.turns), len(r.turns)) - 1)
        raise RecordError(PairReason.PROMPT_MISMATCH, f"chosen and rejected differ at turn {k} (before the answers); "
                                                      f"both sides must share the prompt")
    if c.turns[-1].content == r.turns[-1].content:
        raise RecordError(PairReason.IDENTICAL, "chosen and rejected answers are identical")
    return c, r


@dataclass
class EncodedPairTask:
    files: TaskFiles
    train: list[Pair] = field(default_factory=list)
    val: list[Pair] = field(default_factory=list)
    #: ``samples`` counts responses (2 per pair), as the split statistics do
    counts: TaskCounts = field(default_factory=TaskCounts)


@dataclass
class EncodedPairs:
    tasks: list[EncodedPairTask]
    issues: list[Issue]
    marker_ids: dict[str, list[int]]
    #: as ``encode.Encoded`` (each side of a pair counts as a sample)
    template: str = ""
    system_dropped: dict[str, int] = field(default_factory=dict)
    split_specials: list[str] = field(default_factory=list)


def _encode_side(fmt: ChatFormatter, rec: Record) -> Side:
    ids, mask = fmt.encode([rec])[0]
    prompt_len = len(fmt.encode([Record(turns=rec.turns[:-1])])[0][0])
    mask = mask.copy()
    mask[:prompt_len] = 0  # earlier assistant turns belong to the shared prompt: no loss
    return ids, mask


def _fit(n_c: int, n_r: int, seq: int) -> tuple[int, int]:
    """Lengths to truncate a pair to so that both fit one row: the longer side gives way first."""
    half = seq // 2
    if n_c <= half:
        return n_c, min(n_r, seq - n_c)
    if n_r <= half:
        return min(n_c, seq - n_r), n_r
    return seq - half, half


def encode_pair_chunk(chunk: tuple[int, str, str, int, int, int, int]):
    """``encode._encode_chunk`` for pair lines (same chunk and result contract, run in the same
    worker processes): each accepted pair comes back as two adjacent samples, chosen then
    rejected; a truncated pair has the loss count of its chosen side negated (one truncation per
    pair). A line over the byte limit is rejected unread, as for SFT."""
    task, split, path, first_line, start, end, too_long = chunk
    if too_long:
        return encode._encode_chunk(chunk)
    fmt, spec = encode._FORMATTER, encode._SPEC
    assert fmt is not None and spec is not None
    seq = spec.seq_length
    sides: list[Side] = []
    loss: list[int] = []
    bad = []
    for line_no, raw in encode._chunk_lines(path, first_line, start, end):
        try:
            pair = parse_pair(raw)
            for side in pair or ():
                fmt.check_record(side)
        except RecordError as e:
            bad.append((line_no, e.reason.value, e.detail, False, encode._text(raw)))
            continue
        if pair is None:
            continue
        (ci, cm), (ri, rm) = (_encode_side(fmt, s) for s in pair)
        truncated = False
        if len(ci) + len(ri) > seq:
            detail = f"{len(ci)} + {len(ri)} tokens > seq_length {seq} (a pair fills one row)"
            if spec.overlong != "truncate":
                bad.append((line_no, Reason.OVERLONG.value, detail, spec.overlong == "drop", encode._text(raw)))
                continue
            a, b = _fit(len(ci), len(ri), seq)
            ci, cm, ri, rm = ci[:a], cm[:a], ri[:b], rm[:b]
            if not (cm.any() and rm.any()):
                bad.append((line_no, Reason.OVERLONG.value, "no answer token left on one side after truncation",
                            True, encode._text(raw)))
                continue
            truncated = True
        sides += [(ci, cm), (ri, rm)]
        n_c, n_r = int(cm.sum()), int(rm.sum())
        loss += [-n_c if truncated else n_c, n_r]
    lengths = np.asarray([len(i) for i, _ in sides], dtype=np.int64)
    ends = np.cumsum(lengths)
    ids = np.concatenate([i for i, _ in sides]) if sides else np.zeros(0, np.int32)
    mask = np.concatenate([m for _, m in sides]).astype(np.uint8) if sides else np.zeros(0, np.uint8)
    packed = encode._pack_arrays(ids, mask, fmt.tok.vocab_size)
    return task, split, path, end - start, packed, (ends - lengths, ends, np.asarray(loss, dtype=np.int64)), bad


def encode_pairs(tasks: list[TaskFiles], spec: EncodeSpec, *, workers: int = 1, skip_bad_samples: bool = False,
                 progress: bool = False) -> EncodedPairs:
    """Tokenize every task's pairs through the SFT encoder's chunked reader and worker pool
    (``encode.encode_tasks``: lines over ``spec.max_line_bytes`` rejected unread, at most
    ``MAX_ERRORS`` errors over all files); raise ``DataError`` naming each bad ``file:line``
    unless skipping."""
    sides = encode.encode_tasks(tasks, spec, workers=workers, skip_bad_samples=skip_bad_samples, progress=progress,
                                encode_chunk=encode_pair_chunk)
    out = []
    for t in sides.tasks:
        out.append(EncodedPairTask(t.files, list(zip(t.train[0::2], t.train[1::2])),
                                   list(zip(t.val[0::2], t.val[1::2])), t.counts))
    return EncodedPairs(out, sides.issues, sides.marker_ids, sides.template, sides.system_dropped, sides.split_specials)


def _expand(pairs: list[Pair], pair_packs: list[list[int]], base: int = 0) -> tuple[list[Side], list[list[int]]]:
    samples = [s for p in pairs for s in p]
    return samples, [[base + 2 * i + k for i in p for k in (0, 1)] for p in pair_packs]


def plan_pair_splits(encoded: EncodedPairs, *, seq_length: int, packing: str, val_ratio: float,
                     seed: int) -> tuple[SplitPlan, SplitPlan]:
    """As ``plan.plan_splits``, over pairs: the validation split by files or by a seeded share of
    pairs per task, training packs mix tasks, validation packs per task, and every pack holds
    whole pairs (chosen, rejected adjacent). Pair ``u`` (input order, task by task) has sample
    uids ``2u`` and ``2u + 1``."""
    train, val = SplitPlan(), SplitPlan()
    t_pairs: list[Pair] = []
    t_tasks: list[int] = []
    t_uids: list[int] = []
    uid = 0
    val_parts = []
    for t_id, task in enumerate(encoded.tasks):
        n = len(task.train)
        uids = list(range(uid, uid + n + len(task.val)))
        uid += n + len(task.val)
        if task.val:
            held, v_pairs, v_uids = set(), list(task.val), uids[n:]
        else:
            held = held_out(n, val_ratio, seed, t_id)
            v_pairs = [task.train[i] for i in sorted(held)]
            v_uids = [uids[i] for i in sorted(held)]
        keep = [i for i in range(n) if i not in held]
        t_pairs += [task.train[i] for i in keep]
        t_tasks += [t_id] * len(keep)
        t_uids += [uids[i] for i in keep]
        val_parts.append((task.files.name, v_pairs, v_uids, t_id))
    lengths = [len(c[0]) + len(r[0]) for c, r in t_pairs]
    train.samples, train.packs = _expand(t_pairs, pack(lengths, seq_length, packing))
    train.tasks = [t for t in t_tasks for _ in (0, 1)]
    train.uids = [2 * u + k for u in t_uids for k in (0, 1)]
    train.lengths = [len(s[0]) for s in train.samples]
    for name, pairs, uids, t_id in val_parts:
        start = len(val.packs)
        lengths = [len(c[0]) + len(r[0]) for c, r in pairs]
        samples, packs = _expand(pairs, pack(lengths, seq_length, packing), base=len(val.samples))
        val.packs += packs
        val.samples += samples
        val.lengths += [len(s[0]) for s in samples]
        val.tasks += [t_id] * len(samples)
        val.uids += [2 * u + k for u in uids for k in (0, 1)]
        val.task_packs[name] = [start, len(val.packs)]
    return train, val


def pair_rows(rows: list[Row]) -> list[Row]:
    """Dynamic batching of pairs (``data.batching: dynamic``): each pair row becomes two rows,
    chosen then rejected, one sample per row, so unpacked (SBHD) attention never lets one side see
    the other, and sample ids ``2k``/``2k + 1`` stay the pair's sides; an empty (filler) row
    becomes two, so every micro batch has ``2 x micro_batch_size`` rows."""
    out = []
    for r in rows:
        if not len(r.lengths):
            out += [EMPTY_ROW, EMPTY_ROW]
            continue
        if len(r.lengths) != 2:  # a pair row holds exactly its two sides; anything else would mis-pair
            raise ValueError(f"a preference row holds {len(r.lengths)} samples, not a pair (chosen, rejected)")
        n = int(r.lengths[0])
        out += [Row(r.tokens[:n], r.mask[:n], r.lengths[:1], r.tasks[:1]),
                Row(r.tokens[n:], r.mask[n:], r.lengths[1:], r.tasks[1:])]
    return out


def add_pair_stats(stats: dict, encoded: EncodedPairs, train: SplitPlan, val: SplitPlan) -> dict:
    """stats.json of a preference folder: pairs per task and overall next to the sample counts."""
    n_train, n_val = Counter(train.tasks), Counter(val.tasks)
    for t_id, task in enumerate(encoded.tasks):
        s = stats["tasks"][task.files.name]
        s["pairs"] = task.counts.samples // 2
        s["train_pairs"], s["val_pairs"] = n_train[t_id] // 2, n_val[t_id] // 2
    stats["pairs"] = sum(t.counts.samples // 2 for t in encoded.tasks)
    return stats
