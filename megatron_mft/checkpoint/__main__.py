"""``python -m megatron_mft.checkpoint init --config FILE --out DIR [key=value ...]``

Writes the freshly initialised weights of a config as a megatron dist checkpoint. Because a
dist checkpoint loads into any TP/PP layout, every layout can then start from identical weights
(``train.init_checkpoint=DIR``): the basis of layout-parity checks and reproducible sweeps.

The model is built whole (TP=1, PP=1) in each process. Without CUDA it is built in host memory: a
model that does not fit in what is available (MemAvailable, or less under a cgroup limit) is
refused before it is built (:func:`init_memory`), since the kernel would otherwise kill the process
part-way without a word. ``--skip-memory-check`` builds it anyway. (On a GPU machine the weights
are built on the GPU, and no check runs.)
"""

from __future__ import annotations

import json
import os
import sys

from megatron_mft.errors import HELP, ArgumentParser, UsageError, UserError, command

GiB = 2**30
#: the process besides the weights: interpreter, torch, megatron, the save's writer processes
#: (0.56 GiB measured for the tiny preset)
RUNTIME_BYTES = 3 * GiB // 4


def init_memory(arch, param_bytes: int) -> dict:
    """Host bytes that building ``arch`` on the CPU and saving it take at their peak. Measured
    within 2% on a 0.54B-parameter SwiGLU model in fp32 (3.42 GiB for the whole process tree).

    weights    param_bytes x every parameter (``ArchSpec.num_params``, exact at TP=1);
    save copy  megatron's dist-checkpoint writer clones each tensor that is a view of a larger
               one: the gate and up halves of every SwiGLU fc1 (its sharded state dict splits
               them), so param_bytes x all fc1 weights once more while the save runs;
    init       megatron's CPU initialisation draws each weight whole in fp32 and casts/copies it
               into the parameter: (4 + param_bytes) x the largest weight, while the model is built.
    Peak: RUNTIME_BYTES + weights + the larger of the save copy and the init transient."""
    from megatron_mft.peft.memory import layer_linears

    lins = layer_linears(arch)
    params = arch.num_params()
    fc1 = arch.num_layers * sum(x.weights for x in lins if x.target == "linear_fc1") if arch.gated else 0
    largest = max([arch.vocab_size * arch.hidden_size] + [x.in_features * x.out_features for x in lins])
    total = RUNTIME_BYTES + param_bytes * params + max(param_bytes * fc1, (4 + param_bytes) * largest)
    return {"params": params, "fc1": fc1, "largest": largest, "bytes": total}


def check_memory(cfg, config: str, param_bytes: int, local_processes: int = 1) -> None:
    """Refuse, with the numbers and the way out, a model that does not fit in available memory
    (MemAvailable, or less under a cgroup limit: SLURM's --mem, a container). Every process of a
    node builds the whole model (init forces TP = PP = 1), so ``local_processes`` multiply it."""
    from megatron_mft.compat import available_memory

    available = available_memory()
    if available is None:  # not Linux: nothing to compare with
        return
    need = init_memory(cfg.model.arch(), param_bytes)
    total = need["bytes"] * local_processes
    if total <= available:
        return
    each = (f"{local_processes} processes on this node each build the whole model (init is TP = PP = 1): "
            f"{local_processes} x {need['bytes'] / GiB:.1f} GiB = {total / GiB:.1f} GiB; run it as one process"
            if local_processes > 1 else f"about {total / GiB:.1f} GiB")
    raise UserError(
        f"checkpoint init --config {config}: model preset {cfg.model.preset} ({need['params'] / 1e9:.2f}B parameters, "
        f"{param_bytes}-byte weights built whole on the CPU) needs {each} of memory to build and save, but "
        f"{available / GiB:.1f} GiB is available (MemAvailable, or the room under this job's cgroup memory limit); "
        f"the kernel would kill it part-way. Run it on a machine with more free memory, or convert the model's "
        f"Hugging Face weights instead (python -m megatron_mft.convert hf-to-mcore --hf-dir DIR --out CKPT streams "
        f"one tensor at a time; docs/conversion.md). --skip-memory-check builds it anyway.")


@command
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m megatron_mft.checkpoint", epilog=HELP)
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="save a config's initial weights")
    init.add_argument("--config", required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--skip-memory-check", action="store_true",
                      help="build even if the estimated host memory exceeds what is available")
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

    from megatron_mft.launch.quiet import quiet_known_warnings

    quiet_known_warnings()
    import torch
    from megatron.core import dist_checkpointing

    from megatron_mft.checkpoint.described import INIT_FILE
    from megatron_mft.checkpoint.dist import model_sharded_state_dict
    from megatron_mft.config.base import to_dict
    from megatron_mft.compat import setup_runtime
    from megatron_mft.model import build_model_chunks
    from megatron_mft.model.builder import resolve_dtype
    from megatron_mft.launch.env import read_dist_env
    from megatron_mft.training.parallel import init_parallel, teardown

    env = setup_runtime()
    if not env.cuda and not args.skip_memory_check:
        check_memory(cfg, args.config, resolve_dtype(cfg.model.precision, env).itemsize,
                     read_dist_env().local_world_size)
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
