"""Hugging Face <-> megatron checkpoints: ``python -m megatron_mft.convert COMMAND``.

    hf-to-mcore  --hf-dir DIR [--preset NAME] [--tp T --pp P --ep E] --out CKPT [--dtype D] [--dry-run]
    mcore-to-hf  --ckpt CKPT --out DIR [--merge-lora | --adapter-only] [--dtype D] [--max-shard-size 5GB]
                 [--tokenizer FILE|DIR] [--family NAME]
    verify       --hf-dir DIR [--ckpt CKPT] [--adapter DIR] [--tp T --pp P --ep E] [--tol X]
                 [--batch B --seq S --seed N]

Conversions run in one process (the dist checkpoint they write or read reshards to any TP/PP
layout). ``verify`` with ``--tp``/``--pp``/``--ep`` > 1 needs lcm(tp, ep) x pp ranks: under
``torchrun`` with that many processes it uses torchrun's ranks; started plainly it spawns them itself
(gloo on 127.0.0.1 on the CPU, one GPU per rank with CUDA). See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from megatron_mft.config.base import finite_float, int_range
from megatron_mft.errors import HELP, ArgumentParser, UsageError, UserError, command, report
from megatron_mft.launch.quiet import quiet_known_warnings


def _size(text: str) -> int:
    from megatron_mft.checkpoint.hf.hf_io import parse_size

    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r} (e.g. 5GB, 500MB)")
    return size


POSITIVE = int_range(1)


def _tolerance(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megatron_mft.convert",
                                description="Hugging Face <-> megatron-core checkpoint conversion", epilog=HELP)
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("hf-to-mcore", help="HF folder -> megatron dist checkpoint (streaming)")
    a.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + weights)")
    a.add_argument("--preset", help="check config.json against this preset (else the config is read from it)")
    a.add_argument("--tp", type=POSITIVE, default=1, help="intended tensor-parallel size (validated, recorded)")
    a.add_argument("--pp", type=POSITIVE, default=1, help="intended pipeline-parallel size (validated, recorded)")
    a.add_argument("--ep", type=POSITIVE, default=1, help="intended expert-parallel size, MoE (validated, recorded)")
    a.add_argument("--out", required=True, help="output checkpoint folder (new or empty)")
    a.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="stored dtype (default: the source's)")
    a.add_argument("--dry-run", action="store_true", help="check config, names and shapes; write nothing")

    b = sub.add_parser("mcore-to-hf", help="megatron checkpoint -> HF folder or peft adapter")
    b.add_argument("--ckpt", required=True,
                   help="conversion output, training step dir, or output_dir / checkpoints root (latest)")
    b.add_argument("--out", required=True, help="output folder (new or empty)")
    b.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the base weights")
    b.add_argument("--adapter-only", action="store_true", help="write the adapters in peft format")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: the stored one)")
    b.add_argument("--max-shard-size", default="5GB", type=_size, help="safetensors shard size (default 5GB)")
    b.add_argument("--tokenizer", help="tokenizer to export: a folder of tokenizer files, a SentencePiece .model "
                                       "file or a tokenizer.json file (default: the run's data.tokenizer, found "
                                       "via the checkpoint)")
    b.add_argument("--family", help="Hugging Face family to write, a name of the family registry (default: the "
                                    "base model's, else the run's model.family); for a run that changed its "
                                    "preset's architecture, as model.num_experts on a Llama preset")

    c = sub.add_parser("verify", help="max |logit difference| between the megatron and HF models")
    c.add_argument("--hf-dir", required=True, help="Hugging Face model folder (the reference)")
    c.add_argument("--ckpt", help="megatron checkpoint; without it the model loads --hf-dir via hf_init")
    c.add_argument("--adapter", help="peft adapter folder applied to the HF model (compare with a LoRA run)")
    c.add_argument("--tp", type=POSITIVE, default=1)
    c.add_argument("--pp", type=POSITIVE, default=1)
    c.add_argument("--ep", type=POSITIVE, default=1, help="expert-parallel size (MoE)")
    c.add_argument("--tol", type=_tolerance, default=1e-3, help="max allowed |difference| (default 1e-3)")
    c.add_argument("--batch", type=POSITIVE, default=2)
    c.add_argument("--seq", type=POSITIVE, default=64)
    c.add_argument("--seed", type=int_range(0), default=0)
    c.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="megatron compute dtype")
    c.add_argument("--result", help=argparse.SUPPRESS)  # JSON result file (set when spawning)
    return p


# ------------------------------------------------------------------------------ one process
def _return_freed_memory() -> None:
    """Conversions allocate and free one large tensor after another. glibc raises its mmap
    threshold to the largest block freed so far, after which such tensors come from the heap and
    freed ones stay resident (fragmentation): a fixed threshold keeps big buffers in their own
    mappings, so peak memory stays near the largest tensor. No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _single_process():
    """torch.distributed (one process, its own store) + megatron parallel state at TP=1, PP=1."""
    from megatron_mft.compat import setup_runtime
    from megatron_mft.config import ParallelConfig
    from megatron_mft.launch.env import DistEnv, init_distributed, read_dist_env
    from megatron_mft.training.parallel import init_parallel

    if read_dist_env().world_size > 1:
        raise UsageError("convert hf-to-mcore / mcore-to-hf run in one process; start them without torchrun/srun "
                         "(or set MFT_LAUNCHER=single)")
    _return_freed_memory()
    env = setup_runtime()
    # gloo even on GPU hosts: conversions are host-memory work, and collectives carry CPU objects
    init_distributed(DistEnv.single(), backend="gloo")
    init_parallel(ParallelConfig(), env, seed=0)
    return env


def _hf_to_mcore(args) -> int:
    from megatron_mft.checkpoint.hf.mcore_to_hf import check_out_apart

    check_out_apart(args.out, [(args.hf_dir, "the --hf-dir being read")],
                    "a conversion written into the Hugging Face folder it reads mixes with the model's files")
    _single_process()
    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore
    from megatron_mft.training.parallel import teardown

    try:
        convert_hf_to_mcore(args.hf_dir, args.out, preset=args.preset, tp=args.tp, pp=args.pp, dtype=args.dtype,
                            dry_run=args.dry_run, ep=args.ep)
    finally:  # gloo aborts at interpreter exit if its group is left up
        teardown()
    return 0


def _mcore_to_hf(args) -> int:
    from megatron_mft.checkpoint.hf.families import FAMILIES  # loads torch: not for --help

    if args.family is not None and args.family not in FAMILIES:
        raise UsageError(f"--family {args.family!r}: not a known model family; known: {', '.join(FAMILIES)}")
    _single_process()
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.training.parallel import teardown

    try:
        export_to_hf(args.ckpt, args.out, merge_lora=args.merge_lora, adapter_only=args.adapter_only,
                     dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                     family=args.family)
    finally:  # gloo aborts at interpreter exit if its group is left up
        teardown()
    return 0


# ----------------------------------------------------------------------------------- verify
def _verify_rank(args) -> int:
    """One rank of ``verify`` (torch.distributed from the environment: torchrun, spawned, single)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_mft.checkpoint.hf.verify import build_megatron, hf_logits, megatron_logits, random_tokens
    from megatron_mft.compat import setup_runtime
    from megatron_mft.config import ParallelConfig
    from megatron_mft.training.parallel import init_parallel, teardown

    env = setup_runtime()
    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)
    own_group = not torch.distributed.is_initialized()  # else the caller's group stays up
    init_parallel(par, env, seed=args.seed)
    try:
        chunks, model_cfg = build_megatron(args.hf_dir, args.ckpt, par, env, precision=args.dtype)
        vocab = model_cfg.arch().vocab_size
        tokens = random_tokens(vocab, args.batch, args.seq, args.seed)
        logits = megatron_logits(chunks, tokens, vocab)
        worst = torch.tensor([-1.0], dtype=torch.float64)
        report = {}
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            ref = hf_logits(args.hf_dir, tokens, args.adapter)
            diff = (logits - ref).abs()
            worst[0] = diff.max().item()
            report = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                      "argmax_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      "logit_scale": ref.abs().max().item()}
        if torch.cuda.is_available() and env.cuda:
            worst = worst.cuda()
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        worst = float(worst.item())
        if report:
            ok = report["max_abs_diff"] <= args.tol
            print(f"verify: {args.ckpt or 'hf_init from ' + args.hf_dir} vs {args.hf_dir}"
                  f"{' + adapter ' + args.adapter if args.adapter else ''} at tp={args.tp} pp={args.pp} ep={args.ep}, "
                  f"{args.batch}x{args.seq} random tokens, {args.dtype}")
            print(f"max abs logit difference: {report['max_abs_diff']:.3e} (tol {args.tol:g}) -> "
                  f"{'OK' if ok else 'FAIL'}; mean {report['mean_abs_diff']:.3e}, |logit| max "
                  f"{report['logit_scale']:.3g}, argmax agreement {100 * report['argmax_agreement']:.2f}%",
                  flush=True)
            if args.result:
                Path(args.result).write_text(json.dumps({**report, "ok": ok, "tol": args.tol}))
        torch.distributed.barrier()
        return 0 if 0 <= worst <= args.tol else 1
    finally:
        if own_group:
            teardown()
        else:
            ps.destroy_model_parallel()


def _spawned(local_rank: int, world: int, port: int, argv: list) -> None:
    from megatron_mft.launch.env import join_launcher_store

    try:
        join_launcher_store(local_rank, world, port)  # the store the parent serves (launcher_store)
        _verify_rank(_parser().parse_args(argv))
    except BaseException as e:  # noqa: BLE001 - megatron_mft.errors convention, in the rank (dcp raises BaseException)
        if isinstance(e, SystemExit):
            raise
        sys.exit(report(e))


def _verify(args, argv: list) -> int:
    from megatron_mft.launch.env import launcher_store, read_dist_env

    world = math.lcm(args.tp, args.ep) * args.pp  # expert-parallel ranks come out of the data-parallel ones
    launched = read_dist_env()
    if launched.world_size > 1 or world == 1:
        if launched.world_size % world:
            raise UsageError(f"verify --tp {args.tp} --pp {args.pp} --ep {args.ep} needs a multiple of {world} ranks, "
                             f"got {launched.world_size}")
        return _verify_rank(args)
    # self-spawned ranks; rank 0 reports through a result file
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        argv = [a for a in argv] + ["--result", str(result)]
        print(f"verify: spawning {world} ranks (tp={args.tp} pp={args.pp} ep={args.ep})", flush=True)
        store = launcher_store(world)  # held until the ranks are done
        try:
            mp.start_processes(_spawned, args=(world, store.port, argv), nprocs=world, start_method="spawn")
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:  # a rank failed: its message is above
            print(f"verify: rank {e.error_index} failed", file=sys.stderr)
            code = getattr(e, "exit_code", None)
            return code if code in (1, 2) else 1
        if not result.is_file():
            raise UserError("verify: the ranks finished without reporting a result")
        return 0 if json.loads(result.read_text())["ok"] else 1


@command
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    quiet_known_warnings()
    if args.cmd == "hf-to-mcore":
        return _hf_to_mcore(args)
    if args.cmd == "mcore-to-hf":
        return _mcore_to_hf(args)
    return _verify(args, argv)


if __name__ == "__main__":
    sys.exit(main())
