#!/usr/bin/env python
"""Raw multi-task jsonl -> packed megatron indexed datasets. Thin CLI over megatron_mft.data.

python tools/preprocess/preprocess_mft.py --data-dir DIR --tokenizer-model PATH --seq-length N \
    --packing {none,next-fit,best-fit} --output-dir OUT [--workers K] [--seed S] [--mode {sft,pretrain}] \
    [--skip-bad-samples] [--overlong {error,drop,truncate}] [--max-line-bytes B] [--overwrite] [--debug]
On-disk layout: megatron_mft/data/FORMAT.md. Exit code 2 for bad arguments, 1 for bad input (each line
named file:line) or a failed read/write; --overwrite replaces only an earlier output of this tool.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_mft.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
