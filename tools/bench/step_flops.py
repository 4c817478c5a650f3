#!/usr/bin/env python
"""FLOPs of one optimizer step of a recipe, and the step time they imply at an assumed MFU.

Arithmetic, not a measurement: model and hardware FLOPs from megatron_mft.training.metrics
(docs/performance.md, "FLOPs and MFU") for global_batch_size samples of seq_length tokens each
(whole-window samples: an upper bound of the attention term for packed shorter samples), with
the recipe's PEFT method and recompute. The step time is model FLOPs / (GPUs x MFU x peak); the
recipe headers quote it with the MFU they assume.

    python tools/bench/step_flops.py --config examples/codellama34b_qlora.yaml --gpus 8 --mfu 0.4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_mft.config import load_config  # noqa: E402
from megatron_mft.training.metrics import PEAK_BF16_FLOPS, flop_count  # noqa: E402


from megatron_mft.config.base import finite_float, int_range  # noqa: E402
from megatron_mft.errors import command  # noqa: E402


def step_flops(config: str):
    """(model FLOPs, hardware FLOPs, recompute) of one step of the recipe at ``config``."""
    cfg = load_config(config)
    arch = cfg.model.arch()
    count = flop_count(arch, [cfg.data.seq_length] * cfg.train.global_batch_size, cfg.peft, cfg.model.recompute)
    return count.model, count.hardware, cfg.model.recompute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int_range(1), default=None, help="with --mfu: GPUs running the job")
    ap.add_argument("--mfu", type=finite_float, default=None, help="assumed model FLOPs utilisation, e.g. 0.4")
    ap.add_argument("--card", default="H100", choices=sorted(PEAK_BF16_FLOPS))
    args = ap.parse_args(argv)
    if args.mfu is not None and not 0 < args.mfu <= 1:
        ap.error(f"--mfu: a fraction in (0, 1], e.g. 0.4 for 40%; got {args.mfu:g}")
    if (args.mfu is None) != (args.gpus is None):
        ap.error("--gpus and --mfu go together: the step time needs both")
    model, hardware, recompute = step_flops(args.config)
    print(f"{args.config}: model FLOPs per step {model:.3g}, hardware {hardware:.3g} (recompute {recompute})")
    if args.gpus:
        peak = PEAK_BF16_FLOPS[args.card]
        print(f"at an assumed {100 * args.mfu:g}% MFU on {args.gpus} {args.card} ({peak / 1e12:g} TFLOP/s bf16): "
              f"{model / (args.gpus * args.mfu * peak):.3g} s per step")
    return 0


if __name__ == "__main__":
    sys.exit(command(main)())
