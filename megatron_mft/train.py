"""``python -m megatron_mft.train --config FILE [key=value ...] [--debug]`` (single process, torchrun or srun).

Errors print one message and exit 2 (config) or 1 (run time); ``--debug`` or ``MFT_DEBUG=1`` adds
the traceback (megatron_mft.errors)."""

from __future__ import annotations

import sys

from megatron_mft.config import load_config
from megatron_mft.errors import HELP, ArgumentParser, command
from megatron_mft.launch.env import read_dist_env
from megatron_mft.launch.quiet import quiet_known_warnings
from megatron_mft.launch.signals import catch_early, shield_checkpoint_helper


@command
def main(argv: list[str]) -> int:
    catch_early()  # a SIGUSR1 (SLURM's time-limit warning) during start-up stops the run after step 1
    parser = ArgumentParser(prog="python -m megatron_mft.train", description=__doc__, epilog=HELP)
    parser.add_argument("--config", required=True, help="run YAML (e.g. examples/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2 train.steps=10")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_mft.training.preflight import check_run  # loads torch: only after catch_early

    # the preflight again (Recipe.setup runs it for library use), here before megatron is imported:
    # a wrong path or process count is reported in a second, not after the imports
    check_run(cfg, read_dist_env().world_size)
    quiet_known_warnings()
    shield_checkpoint_helper()  # SLURM signals every process of the step, the writer's helper too
    from megatron_mft.training.recipe import Recipe

    return Recipe(cfg, config_file=args.config).run()


if __name__ == "__main__":
    sys.exit(main())
