"""``python -m megatron_mft.checkpoint init --config FILE --out DIR [key=value ...]``

Writes the freshly initialised weights of a config as a megatron dist checkpoint. Because a
dist checkpoint loads into any TP/PP layout, every layout can then start from identical weights
(``train.init_checkpoint=DIR``): the basis of layout-parity checks and reproducible sweeps.
"""

from __future__ import annotations

import json
import os
import sys

from megatron_mft.errors import HELP, ArgumentParser, UsageError, command


@command
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m megatron_mft.checkpoint", epilog=HELP)
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="save a config's initial weights")
    init.add_argument("--config", required=True)
    init.add_argument("--out", required=True)
    init.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"checkpoint init --out {args.out}: refusing to write into a non-empty folder (its files, "
                         f"e.g. {sorted(os.listdir(args.out))[0]}, would be overwritten); give a new or empty folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"checkpoint init --out {args.out}: exists and is not a folder")

    from megatron_mft.config import load_config

    # config errors are reported before megatron is imported (seconds, and none of its import warnings)
    cfg = load_config(args.config, args.overrides + ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=null",
                                                      "parallel.sp=false"])

    import torch
    from megatron.core import dist_checkpointing

    from megatron_mft.checkpoint.described import INIT_FILE
    from megatron_mft.checkpoint.dist import model_sharded_state_dict
    from megatron_mft.config.base import to_dict
    from megatron_mft.compat import setup_runtime
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel, teardown

    env = setup_runtime()
    init_parallel(cfg.parallel, env, cfg.seed)  # starts torch.distributed from the launch environment
    chunks = build_model_chunks(cfg.model, cfg.parallel, env)
    os.makedirs(args.out, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), args.out)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        # what the weights are: train.init_checkpoint's preflight compares it with the run's model
        with open(os.path.join(args.out, INIT_FILE), "w", encoding="utf-8") as f:
            json.dump({"model": to_dict(cfg.model), "seed": cfg.seed}, f, indent=1)
    print(f"wrote initial weights of {cfg.model.preset} (seed {cfg.seed}) to {args.out}")
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
