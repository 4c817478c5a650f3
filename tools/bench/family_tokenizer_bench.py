#!/usr/bin/env python
"""Preprocessing throughput with the families' byte-level BPE tokenizers (issue 15), against the raw
``tokenizers`` library on the same texts with the same number of processes: the data-path target
of issue 3 (preprocessing >= 80% of the tokenizer's throughput), for HF ``tokenizer.json`` files.

The real Llama-3 / Qwen2.5 / StarCoder2 files are not on the package registries; the stand-ins of
tests/test_families_fixtures.py are used (each family's pre-tokenizer, byte-level decoder, special
tokens at their real ids, vocabulary of the real size), with ``--merges`` merges trained on the
demo data. Llama-3 runs the llama3.1 chat format, Qwen2.5 qwen2, StarCoder2 mftcoder (its own format has no
system role, and the demo data has system turns); with these ``tokenizer.json`` files the chat template
takes its joint path (each sample encoded as one string, the loss mask from token offsets). Trials are pairs
(tokenizer, preprocessing), the order alternating; the median of the paired ratios is the figure
to trust on a shared machine, and the CPU-time ratio does not depend on what else runs.

    python tools/bench/family_tokenizer_bench.py [--workers 2] [--repeat-data 2] [--trials 5] [--merges 8000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools" / "bench"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from data_bench import SEQ, _cpu, machine, replicate, segment_texts  # noqa: E402

#: stand-in -> chat format (the demo data has system turns, which StarCoder2's format refuses)
FAMILIES = {"llama3": "llama3.1", "qwen2": "qwen2", "starcoder2": "mftcoder"}
_TOK = None


from megatron_mft.config.base import choice_list, int_range  # noqa: E402
from megatron_mft.errors import command  # noqa: E402


def _init(path: str) -> None:
    global _TOK
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_file(path)


def _encode(texts: list[str]) -> int:
    return sum(len(e.ids) for e in _TOK.encode_batch(texts, add_special_tokens=False))


def tokenizer_throughput(chunks: list[list[str]], workers: int, path: str) -> tuple[float, float, int]:
    """(wall s, CPU s of all processes, tokens): ``tokenizers`` alone, same chunks, same processes."""
    c0, t0 = _cpu(), time.perf_counter()
    if workers > 1:
        with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(path,)) as pool:
            n = sum(pool.imap(_encode, chunks, chunksize=1))
    else:
        _init(path)
        n = sum(map(_encode, chunks))
    return time.perf_counter() - t0, _cpu() - c0, n


def run_preprocess(raw: Path, out: Path, tokenizer: Path, template: str, workers: int):
    from megatron_mft.data.preprocess import PreprocessArgs, preprocess

    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = _cpu(), time.perf_counter()
    stats = preprocess(PreprocessArgs(str(raw), str(tokenizer), SEQ, "best-fit", str(out), workers=workers,
                                      template=template, overlong="drop", progress=False))
    return time.perf_counter() - t0, _cpu() - c0, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int_range(1), default=2)
    ap.add_argument("--repeat-data", type=int_range(1), default=2)
    ap.add_argument("--trials", type=int_range(1), default=5)
    ap.add_argument("--merges", type=int_range(1), default=8000, help="BPE merges trained on the demo data")
    ap.add_argument("--families", default=",".join(FAMILIES), type=choice_list(list(FAMILIES)),
                    help="comma-separated chat formats")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process, both sides

    from test_families_fixtures import demo_texts, make_family_tokenizer

    import megatron_mft.data.indexed  # noqa: F401,I001  one-time import, outside every timing

    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="family_tok_bench_"))
    summary = {}
    try:
        raw = replicate(tmp / "raw_x", args.repeat_data)
        mb = sum(f.stat().st_size for f in raw.glob("*/*.jsonl")) / 1e6
        chunks = segment_texts(raw)
        corpus = demo_texts(per_task=10 ** 6)
        print(f"demo data x{args.repeat_data} ({mb:.1f} MB), {args.workers} process(es), {args.trials} paired "
              f"trials, seq {SEQ} best-fit; TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}")
        for name in args.families:
            folder = make_family_tokenizer(name, tmp / "tok" / name, corpus, merges_vocab=args.merges)
            path = str(folder / "tokenizer.json")
            pairs = []
            for trial in range(args.trials):
                if trial % 2:
                    w, c, st = run_preprocess(raw, tmp / "out", folder, FAMILIES[name], args.workers)
                    tok = tokenizer_throughput(chunks, args.workers, path)
                else:
                    tok = tokenizer_throughput(chunks, args.workers, path)
                    w, c, st = run_preprocess(raw, tmp / "out", folder, FAMILIES[name], args.workers)
                pairs.append((tok[0], tok[1], w, c))
            tw = statistics.median(p[0] for p in pairs)
            pw = statistics.median(p[2] for p in pairs)
            wall = statistics.median(p[0] / p[2] for p in pairs)
            cpu = statistics.median(p[1] / p[3] for p in pairs)
            eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
            print(f"\n[{name}] chat format {FAMILIES[name]}, eos {eos}, {args.merges} merges")
            print(f"    raw tokenizers.encode_batch: median wall {tw:.3f} s = {tok[2] / tw:,.0f} tokens/s")
            print(f"    preprocess (read+validate+template+tokenize+pack+write): median wall {pw:.3f} s = "
                  f"{st['tokens'] / pw:,.0f} tokens/s incl. template tokens")
            print(f"    preprocessing / tokenizer throughput (median of paired trials): wall {100 * wall:.0f}%, "
                  f"CPU {100 * cpu:.0f}%   pairs (tok s, prep s): {[(round(p[0], 2), round(p[2], 2)) for p in pairs]}")
            summary[name] = {"wall": round(wall, 3), "cpu": round(cpu, 3)}
        print("\nsummary: " + json.dumps({"preprocess_vs_tokenizer": summary}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(command(main)())
