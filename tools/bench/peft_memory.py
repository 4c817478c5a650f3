#!/usr/bin/env python
"""Per-GPU memory of LoRA and QLoRA training for CodeLlama-34B and Llama-2-70B at a layout.

An estimate from the architecture (megatron_mft.config.presets) and this implementation's
storage rules (megatron_mft.peft.memory); the formulas are printed under the table. It does
not allocate anything, so it runs anywhere. CUDA context, NCCL buffers and allocator slack are
not included (budget 2-5 GB per GPU).

    python tools/bench/peft_memory.py                                  # both models, 2 layouts
    python tools/bench/peft_memory.py --layout 1,1,1 --seq 4096 --micro-batch 1 --rank 64
    python tools/bench/peft_memory.py --models llama2-70b --layout 2,1,4 --sp --recompute none
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_mft.config.peft import PEFT_TARGETS  # noqa: E402
from megatron_mft.config.presets import PRESETS  # noqa: E402
from megatron_mft.peft.memory import GB, estimate_memory  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["codellama-34b", "llama2-70b"], choices=sorted(PRESETS))
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    ap.add_argument("--layout", action="append", default=None, metavar="TP,PP,DP",
                    help="tensor,pipeline,data parallel sizes (repeatable; default 1,1,1 and 2,1,4)")
    ap.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                    help="sequence parallelism (default: on when tp > 1)")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", nargs="+", default=list(PEFT_TARGETS), choices=list(PEFT_TARGETS))
    ap.add_argument("--recompute", default="full", choices=["none", "selective", "full"])
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="card size for the 'fits' column")
    ap.add_argument("--overhead-gb", type=float, default=4.0,
                    help="CUDA context + NCCL + allocator slack assumed for the 'fits' column")
    args = ap.parse_args(argv)
    layouts = [tuple(int(x) for x in lay.split(",")) for lay in (args.layout or ["1,1,1", "2,1,4"])]

    cols = ["base", "adapters", "grads", "optim", "activ", "logits", "dequant", "total"]
    print(f"per-GPU memory, GB (1e9 B); s={args.seq} b={args.micro_batch} r={args.rank} "
          f"targets={','.join(args.targets)} recompute={args.recompute} bf16; most loaded pipeline stage")
    head = f"{'model':<14} {'method':<6} {'tp,pp,dp':<9} {'sp':<3} " + " ".join(f"{c:>8}" for c in cols)
    head += f" {'fits ' + format(args.gpu_gb, 'g') + 'GB':>10}  trainable"
    print(head)
    print("-" * len(head))
    for name in args.models:
        arch = PRESETS[name]
        for tp, pp, dp in layouts:
            sp = (tp > 1) if args.sp is None else (args.sp and tp > 1)
            for method in args.methods:
                est = estimate_memory(arch, method=method, rank=args.rank, targets=args.targets, tp=tp, pp=pp,
                                      dp=dp, vpp=args.vpp, sp=sp, seq_length=args.seq, micro_batch=args.micro_batch,
                                      recompute=args.recompute,
                                      distributed_optimizer=not args.no_distributed_optimizer)
                vals = [est.base_weights, est.adapters, est.grads, est.optimizer, est.activations, est.logits,
                        est.workspace, est.total]
                fits = "yes" if est.total / GB + args.overhead_gb <= args.gpu_gb else "no"
                share = 100 * est.trainable_params / est.total_params
                print(f"{name:<14} {method:<6} {f'{tp},{pp},{dp}':<9} {'on' if sp else 'off':<3} "
                      + " ".join(f"{v / GB:8.2f}" for v in vals)
                      + f" {fits:>10}  {est.trainable_params / 1e6:.1f}M ({share:.2f}%)")
                for note in est.notes:
                    print(f"{'':<14} note: {note}")
    print(f"\n'fits' adds {args.overhead_gb:g} GB for CUDA context, NCCL buffers and allocator slack.")
    print("\nFormulas (megatron_mft.peft.memory.estimate_memory):")
    doc = inspect.getdoc(estimate_memory).split("\n", 2)[-1]
    print("\n".join("  " + line for line in doc.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
