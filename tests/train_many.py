"""Several training runs in one process: ``python tests/train_many.py RUNS.json`` (or under torchrun).

RUNS.json is a list of argument lists for ``python -m megatron_mft.train``; each goes through that
command's own ``main`` (argument parsing, config, preflight, ``Recipe.run``, error messages), one
after the other. A test that needs several runs of one layout pays the interpreter, import and
process-group start-up once instead of once per run (seconds each on 2 shared cores). Stops at the
first run that fails, with its exit code and the index of the run on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _keep_process_group() -> None:
    """Between runs, tear down megatron's groups but keep the process group: a second
    ``init_process_group`` on torchrun's store would read the first one's addresses (gloo then
    fails to connect). ``init_parallel`` takes an existing group as the CLI's first run makes it.
    (Megatron's process-wide MoE loss tracker is the product's to empty: RouterLoad does, so a run
    without router losses never reports the previous run's; these shared launches test that.)"""
    from megatron.core import parallel_state as ps

    from megatron_mft.training import recipe

    def teardown(after_error: bool = False) -> None:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()

    recipe.teardown = teardown


def _groups_left_up() -> bool:
    """Every run, refused ones too, ends through the recipe's teardown (patched above): a process
    that leaves its groups up can abort at exit (gloo's threads, pytorch#190489)."""
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()


def main(path: str) -> int:
    """Entries: an argument list (must exit 0), or ``{"argv": [...], "rc": N}`` (must exit N)."""
    import torch

    from megatron_mft.train import main as train

    _keep_process_group()
    runs = json.loads(Path(path).read_text())
    try:
        for i, run in enumerate(runs):
            argv, want = (run, 0) if isinstance(run, list) else (run["argv"], run["rc"])
            for stream in (sys.stdout, sys.stderr):
                print(f"=== run {i}: {' '.join(argv)}", file=stream, flush=True)
            rc = train(argv)
            if _groups_left_up():
                print(f"train_many: run {i} ended without tearing down megatron's parallel groups",
                      file=sys.stderr, flush=True)
                return 3
            if rc != want:
                print(f"train_many: run {i} exited {rc}, expected {want}", file=sys.stderr, flush=True)
                return rc or 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
