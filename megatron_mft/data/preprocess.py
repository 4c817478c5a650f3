"""Offline preprocessing: raw task folders -> packed indexed datasets + manifest + stats.

Runs top to bottom: discover tasks, tokenize (several processes), split, pack, write. All
output goes to a temporary sibling folder that is swapped into place only at the very end, so
an error (bad input, interrupt) never leaves a partial output folder behind, and an existing
folder is replaced only when it is an earlier output of this tool (``outdir``).
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import shutil
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megatron_mft.data.encode import (MAX_LINE_BYTES, EncodeSpec, Encoded, encode_tasks, task_warnings,
                                      usable_workers)
from megatron_mft.data.outdir import OUTPUT_FORMAT, output_dir_problems, swap_into_place, temp_dir_for
from megatron_mft.data.packing import PACKERS, padding_ratio
from megatron_mft.data.plan import SplitPlan, plan_splits
from megatron_mft.data.records import DataError
from megatron_mft.data.store import MemorySplit
from megatron_mft.data.taskdir import discover_tasks
from megatron_mft.data.template import TEMPLATES, load_template
from megatron_mft.data.tokenizer import load_tokenizer
from megatron_mft.errors import ArgumentParser, UsageError, UserError, command


@dataclass
class PreprocessArgs:
    data_dir: str
    tokenizer_model: str
    seq_length: int
    packing: str
    output_dir: str
    workers: int = 1
    seed: int = 1234
    mode: str = "sft"
    skip_bad_samples: bool = False
    overlong: str = "error"
    template: str = "mftcoder"
    val_ratio: float = 0.05
    overwrite: bool = False
    progress: bool = True
    max_line_bytes: int = MAX_LINE_BYTES

    def problems(self) -> list[str]:
        p = []
        if self.seq_length < 8:
            p.append(f"--seq-length {self.seq_length}: must be >= 8")
        if self.packing not in PACKERS:
            p.append(f"--packing {self.packing}: expected one of {', '.join(PACKERS)}")
        if self.workers < 1:
            p.append(f"--workers {self.workers}: must be >= 1")
        if self.mode not in ("sft", "pretrain", "preference"):
            p.append(f"--mode {self.mode}: expected sft, pretrain or preference")
        if self.overlong not in ("error", "drop", "truncate"):
            p.append(f"--overlong {self.overlong}: expected error, drop or truncate")
        if not 0.0 <= self.val_ratio < 1.0:
            p.append(f"--val-ratio {self.val_ratio}: must be in [0, 1)")
        if self.max_line_bytes < 1:
            p.append(f"--max-line-bytes {self.max_line_bytes}: must be >= 1")
        return p + output_dir_problems(self.output_dir, self.data_dir, self.tokenizer_model, self.overwrite)


def _task_stats(encoded: Encoded, train: SplitPlan, val: SplitPlan) -> dict:
    out = {}
    n_train, n_val = Counter(train.tasks), Counter(val.tasks)
    for t_id, task in enumerate(encoded.tasks):
        c = task.counts
        out[task.files.name] = {
            "id": t_id,
            "samples": c.samples,
            "train_samples": n_train[t_id],
            "val_samples": n_val[t_id],
            "tokens": c.tokens,
            "loss_tokens": c.loss_tokens,
            "dropped": c.dropped,
            "truncated": c.truncated,
            "rejected": c.rejected,
            "rejected_reasons": dict(sorted(c.reasons.items())),
            "val_source": task.files.val_source,
        }
    return out


def _split_stats(plan: SplitPlan, seq_length: int) -> dict:
    return {
        "sequences": len(plan.packs),
        "samples": len(plan.samples),
        "tokens": plan.tokens,
        "padding_ratio": round(plan.padding_ratio(seq_length), 6),
    }


def build_manifest(args: PreprocessArgs, tok_identity: dict, template, encoded: Encoded,
                   train: SplitPlan, val: SplitPlan, dtypes: dict) -> dict:
    return {
        "format": OUTPUT_FORMAT,
        "mode": args.mode,
        "seq_length": args.seq_length,
        "packing": args.packing,
        "seed": args.seed,
        "val_ratio": args.val_ratio,
        "tokenizer": tok_identity | {"marker_ids": encoded.marker_ids},
        "template": template.to_dict(),
        "tasks": [
            {"id": i, "name": t.files.name, "train_files": list(t.files.train), "val_files": list(t.files.val),
             "val_source": t.files.val_source}
            for i, t in enumerate(encoded.tasks)
        ],
        "splits": {
            "train": {"prefix": "train", "sequences": len(train.packs), "samples": len(train.samples)},
            "val": {"prefix": "val", "sequences": len(val.packs), "samples": len(val.samples),
                    "task_packs": val.task_packs},
        },
        "datasets": {part: {"dtype": getattr(dt, "__name__", str(dt))} for part, dt in dtypes.items()},
    }


def preprocess(args: PreprocessArgs) -> dict:
    """Build the output folder; return the stats (its ``warnings`` also go to stderr). Raises
    ``UsageError`` for bad arguments (a data folder, tokenizer or template that cannot be used, an
    output folder that may not be replaced) and ``UserError`` (e.g. ``DataError``) otherwise."""
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    workers = usable_workers(args.workers)
    if workers < args.workers:
        print(f"note: --workers {args.workers}: {workers} used, one per CPU this process may run on",
              file=sys.stderr, flush=True)
        args = dataclasses.replace(args, workers=workers)
    t0 = time.perf_counter()
    warnings: list[str] = []

    def warn(w: str) -> None:  # printed when found, all kept for the stats
        warnings.append(w)
        print(f"warning: {w}", file=sys.stderr)

    tasks = discover_tasks(args.data_dir, warn)
    tok = load_tokenizer(args.tokenizer_model)
    template = load_template(args.template)
    mode = "sft" if args.mode == "preference" else args.mode  # each side of a pair is an SFT sample
    spec = EncodeSpec(args.tokenizer_model, template, args.seq_length, mode, args.overlong,  # type: ignore[arg-type]
                      args.max_line_bytes)
    if args.mode == "preference":  # pairs: megatron_mft.data.preference
        from megatron_mft.data.preference import encode_pairs, plan_pair_splits

        encoded = encode_pairs(tasks, spec, workers=args.workers, skip_bad_samples=args.skip_bad_samples,
                               progress=args.progress)
    else:
        encoded = encode_tasks(tasks, spec, workers=args.workers, skip_bad_samples=args.skip_bad_samples,
                               progress=args.progress)
    for w in task_warnings(encoded):
        warn(w)
    t_tokenized = time.perf_counter()
    plan = plan_pair_splits if args.mode == "preference" else plan_splits
    train, val = plan(encoded, seq_length=args.seq_length, packing=args.packing,  # type: ignore[arg-type]
                      val_ratio=args.val_ratio, seed=args.seed)
    t_packed = time.perf_counter()
    if not train.samples:
        raise DataError([f"{args.data_dir}: no usable training samples"])

    t_import = time.perf_counter()
    from megatron_mft.data import indexed
    # Imported late so bad input fails fast; its one-time cost (seconds) is not data throughput.
    import_seconds = time.perf_counter() - t_import

    out = Path(args.output_dir).resolve()
    tmp = temp_dir_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"--output-dir {args.output_dir}: cannot create {e.filename or tmp} ({e.strerror or e})") from None
    try:
        for name, plan in (("train", train), ("val", val)):
            indexed.write_split(tmp, name, MemorySplit(plan.samples, plan.tasks, plan.uids, plan.packs),
                                vocab_size=tok.vocab_size, num_tasks=len(tasks), threads=args.workers)
        dtypes = indexed.dtypes(tok.vocab_size, len(tasks))
        manifest = build_manifest(args, tok.identity(), template, encoded, train, val, dtypes)
        with open(tmp / "rejected.jsonl", "w", encoding="utf-8") as f:
            for issue in encoded.issues:
                f.write(json.dumps(issue.to_json(), ensure_ascii=False) + "\n")
        t_written = time.perf_counter()
        elapsed = t_written - t0 - import_seconds
        total_tokens = train.tokens + val.tokens
        all_seqs = len(train.packs) + len(val.packs)
        per_task = _task_stats(encoded, train, val)
        reasons: dict[str, int] = {}
        for t in per_task.values():
            for k, v in t["rejected_reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        stats = {
            "tasks": per_task,
            "samples": sum(t["samples"] for t in per_task.values()),
            "tokens": total_tokens,
            "loss_tokens": sum(t["loss_tokens"] for t in per_task.values()),
            "dropped": sum(t["dropped"] for t in per_task.values()),
            "truncated": sum(t["truncated"] for t in per_task.values()),
            "rejected": sum(t["rejected"] for t in per_task.values()),
            "rejected_reasons": dict(sorted(reasons.items())),
            # samples whose system turn the template dropped (mistral-v3), per input file; warned
            "system_turns_dropped": dict(sorted(encoded.system_dropped.items())),
            "sequences": all_seqs,
            "padding_ratio": round(padding_ratio(total_tokens, all_seqs, args.seq_length), 6),
            "splits": {"train": _split_stats(train, args.seq_length), "val": _split_stats(val, args.seq_length)},
            "seq_length": args.seq_length,
            "packing": args.packing,
            "workers": args.workers,
            "seconds": round(elapsed, 3),
            "import_seconds": round(import_seconds, 3),
            "phase_seconds": {"tokenize": round(t_tokenized - t0, 3), "pack": round(t_packed - t_tokenized, 3),
                              "write": round(t_written - t_packed - import_seconds, 3)},
            "tokens_per_s": round(total_tokens / elapsed, 1) if elapsed > 0 else 0.0,
            "warnings": warnings,
        }
        if args.mode == "preference":
            from megatron_mft.data.preference import add_pair_stats

            add_pair_stats(stats, encoded, train, val)  # type: ignore[arg-type]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        # checked again: the folder may have changed (a user's file put in it) since the start
        problems = output_dir_problems(args.output_dir, args.data_dir, args.tokenizer_model, args.overwrite)
        if problems:
            raise UsageError("\n".join(problems))
        swap_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--output-dir {args.output_dir}: writing failed at {e.filename or tmp} "
                        f"({e.strerror or e}); the previous contents, if any, are unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="preprocess_mft.py",
        description="Raw multi-task chat jsonl -> packed megatron indexed datasets (.bin/.idx), "
                    "manifest.json, stats.json, rejected.jsonl. Layout: megatron_mft/data/FORMAT.md.",
    )
    p.add_argument("--data-dir", required=True, help="one sub-folder of .jsonl files per task")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file or HF tokenizer folder")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--packing", choices=list(PACKERS), required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234, help="validation split by ratio")
    p.add_argument("--mode", choices=["sft", "pretrain", "preference"], default="sft",
                   help="pretrain: loss on every real token (text records always are); preference: "
                        "{chosen, rejected} pairs kept together in one row (docs/preference.md)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip bad lines, count them per reason in stats.json and log them to rejected.jsonl")
    p.add_argument("--overlong", choices=["error", "drop", "truncate"], default="error",
                   help="samples longer than --seq-length")
    p.add_argument("--template", default="mftcoder", help=f"one of {', '.join(TEMPLATES)} or a .json file")
    p.add_argument("--val-ratio", type=float, default=0.05,
                   help="held-out share per task that has no validation files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output-dir if it is an earlier output of this tool (never the data or tokenizer)")
    p.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                   help="a longer input line is rejected (line_too_long) without being read; default 64 MiB")
    p.add_argument("--no-progress", action="store_true")
    p.epilog = "Errors exit 2 (arguments) or 1 (data, files); --debug or MFT_DEBUG=1 shows the traceback."
    return p


@command
def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    args = PreprocessArgs(
        data_dir=ns.data_dir, tokenizer_model=ns.tokenizer_model, seq_length=ns.seq_length, packing=ns.packing,
        output_dir=ns.output_dir, workers=ns.workers, seed=ns.seed, mode=ns.mode,
        skip_bad_samples=ns.skip_bad_samples, overlong=ns.overlong, template=ns.template,
        val_ratio=ns.val_ratio, overwrite=ns.overwrite, progress=not ns.no_progress,
        max_line_bytes=ns.max_line_bytes,
    )
    stats = preprocess(args)
    s = stats["splits"]
    print(
        f"wrote {args.output_dir}: {len(stats['tasks'])} tasks, {stats['samples']} samples "
        f"({s['train']['samples']} train / {s['val']['samples']} val), {stats['sequences']} sequences, "
        f"padding {100 * stats['padding_ratio']:.2f}% (train {100 * s['train']['padding_ratio']:.2f}%), "
        f"{stats['rejected']} rejected, {stats['dropped']} dropped, {stats['truncated']} truncated, "
        f"{stats['tokens_per_s']:.0f} tokens/s"
    )
    return 0


__all__ = ["PreprocessArgs", "build_parser", "main", "preprocess"]
