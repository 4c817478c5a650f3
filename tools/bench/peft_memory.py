#!/usr/bin/env python
"""Per-GPU memory of LoRA and QLoRA training for CodeLlama-34B and Llama-2-70B at a layout.

An estimate from the architecture (megatron_mft.config.presets) and this implementation's
storage rules (megatron_mft.peft.memory); the formulas are printed under the table. It does
not allocate anything, so it runs anywhere. CUDA context, NCCL buffers and allocator slack are
not included (budget 2-5 GB per GPU).

    python tools/bench/peft_memory.py                                  # both models, 2 layouts
    python tools/bench/peft_memory.py --layout 1,1,1 --seq 4096 --micro-batch 1 --rank 64
    python tools/bench/peft_memory.py --models llama2-70b --layout 2,1,4 --sp --recompute none

``--measure-load`` instead measures, on this machine, the peak host (CPU: ru_maxrss) or device
(CUDA: max allocated) memory of building a model and loading a dense dist checkpoint into it:
full model, LoRA, QLoRA (layer-by-layer quantisation), each in a fresh process, for a
mid-size Llama shape (``--measure-shape LAYERS,HIDDEN,FFN``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_mft.config.peft import PEFT_TARGETS  # noqa: E402
from megatron_mft.config.presets import PRESETS  # noqa: E402
from megatron_mft.peft.memory import GB, MemoryEstimate, estimate_memory  # noqa: E402


from megatron_mft.config import tool_config  # noqa: E402
from megatron_mft.config.base import int_list, int_range  # noqa: E402
from megatron_mft.errors import UsageError, command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["codellama-34b", "llama2-70b"], choices=sorted(PRESETS))
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    ap.add_argument("--layout", action="append", default=None, metavar="TP,PP,DP", type=int_list(1, "TP,PP,DP"),
                    help="tensor,pipeline,data parallel sizes (repeatable; default 1,1,1 and 2,1,4)")
    ap.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                    help="sequence parallelism (default: on when tp > 1)")
    ap.add_argument("--vpp", type=int_range(1), default=None, help="virtual pipeline stages per rank")
    ap.add_argument("--ep", type=int_range(1), default=1, help="expert-parallel ranks (MoE presets; carved from TP x DP)")
    ap.add_argument("--cp", type=int_range(1), default=1, help="context-parallel ranks (each holds s/cp tokens of a sequence)")
    ap.add_argument("--cp-gathered-kv", action="store_true",
                    help="CP without TE: the all-gather-KV attention keeps the whole sequence's K/V")
    ap.add_argument("--seq", type=int_range(1), default=4096)
    ap.add_argument("--micro-batch", type=int_range(1), default=1)
    ap.add_argument("--rank", type=int_range(1), default=64)
    ap.add_argument("--targets", nargs="+", default=list(PEFT_TARGETS), choices=list(PEFT_TARGETS))
    ap.add_argument("--recompute", default="full", choices=["none", "selective", "full"])
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="card size for the 'fits' column")
    ap.add_argument("--overhead-gb", type=float, default=4.0,
                    help="CUDA context + NCCL + allocator slack assumed for the 'fits' column")
    ap.add_argument("--measure-load", action="store_true", help="measure model build + base-weight load peaks")
    ap.add_argument("--measure-shape", default="8,1024,2816", metavar="LAYERS,HIDDEN,FFN",
                    type=int_list(1, "LAYERS,HIDDEN,FFN"))
    return ap


#: the options' names in the training config's messages
LAYOUT_OPTIONS = {"parallel.tp": "--layout TP", "parallel.pp": "--layout PP", "parallel.vpp": "--vpp",
                  "parallel.sp": "--sp", "parallel.ep": "--ep", "parallel.cp": "--cp", "data.seq_length": "--seq",
                  "peft.rank": "--rank", "peft.target_modules": "--targets"}


def estimates(args: argparse.Namespace) -> list[tuple[str, str, tuple[int, int, int], bool, MemoryEstimate]]:
    """(model, method, (tp, pp, dp), sp, estimate) for every row the arguments ask for (the recipe
    headers quote these rows; tests/test_recipes.py checks them through this function). A layout
    training would refuse for a model (heads or layers not divisible, experts not by --ep, a
    sequence not in 2 x cp chunks) is refused, with the training config's rules."""
    layouts = args.layout or [(1, 1, 1), (2, 1, 4)]
    moe = [name for name in args.models if PRESETS[name].num_experts]
    if args.ep > 1 and not moe:
        raise UsageError(f"peft_memory.py: --ep {args.ep}: expert parallelism is for mixture-of-experts presets "
                         f"({', '.join(n for n in PRESETS if PRESETS[n].num_experts)}), and --models has none")
    # sequence parallelism the user did not ask for is the default at TP > 1: named so, with how to turn it off
    options = {**LAYOUT_OPTIONS, **({"parallel.sp": "sequence parallelism (on at --layout TP > 1 unless --no-sp)"}
                                    if args.sp is None else {})}
    rows = []
    for name in args.models:
        ep = args.ep if name in moe else 1  # --ep applies to the MoE presets; a dense one gets its rows
        for tp, pp, dp in layouts:
            sp = (tp > 1) if args.sp is None else (args.sp and tp > 1)
            tool_config(f"peft_memory.py --models {name} --layout {tp},{pp},{dp}", {
                "model.preset": name, "model.recompute": args.recompute, "parallel.tp": tp, "parallel.pp": pp,
                "parallel.vpp": args.vpp, "parallel.sp": sp, "parallel.ep": ep, "parallel.cp": args.cp,
                "data.seq_length": args.seq, "peft.method": "lora", "peft.rank": args.rank,
                "peft.target_modules": args.targets}, options)
            for method in args.methods:
                est = estimate_memory(PRESETS[name], method=method, rank=args.rank, targets=args.targets, tp=tp,
                                      pp=pp, dp=dp, vpp=args.vpp, sp=sp, seq_length=args.seq,
                                      micro_batch=args.micro_batch, recompute=args.recompute,
                                      distributed_optimizer=not args.no_distributed_optimizer, ep=ep,
                                      cp=args.cp, cp_gathered_kv=args.cp_gathered_kv)
                rows.append((name, method, (tp, pp, dp), sp, est))
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure_load:
        return measure_load(args.measure_shape, args.rank)

    rows = estimates(args)  # refuses a layout before the table starts
    cols = ["base", "adapters", "grads", "optim", "activ", "logits", "dequant", "total"]
    print(f"per-GPU memory, GB (1e9 B); s={args.seq} b={args.micro_batch} r={args.rank} "
          f"targets={','.join(args.targets)} recompute={args.recompute} bf16; most loaded pipeline stage")
    head = f"{'model':<14} {'method':<6} {'tp,pp,dp':<9} {'sp':<3} " + " ".join(f"{c:>8}" for c in cols)
    head += f" {'fits ' + format(args.gpu_gb, 'g') + 'GB':>10}  trainable"
    print(head)
    print("-" * len(head))
    for name, method, (tp, pp, dp), sp, est in rows:
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


ROOT = Path(__file__).resolve().parents[2]


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(method: str, ckpt: str, overrides: list[str], rank: int) -> None:
    """Build + load in this fresh process; print one JSON line."""
    from megatron_mft.compat import setup_runtime
    from megatron_mft.config import load_config

    env = setup_runtime()
    cfg = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), overrides + [f"peft.method={method}"]
                      + ([f"peft.rank={rank}"] if method != "none" else []))
    from megatron_mft.launch import init_distributed

    init_distributed()
    from megatron_mft.checkpoint.dist import load_model_weights
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan
    from megatron_mft.peft.plan import local_bytes
    from megatron_mft.training.parallel import init_parallel, teardown

    init_parallel(cfg.parallel, env, cfg.seed)
    import gc

    gc.collect()
    before = _peak_bytes() if not env.cuda else 0
    plan = PeftPlan(cfg.peft, env) if method != "none" else None
    chunks = build_model_chunks(cfg.model, cfg.parallel, env, layer=plan.layer_spec(cfg.model) if plan else None)
    built = _peak_bytes()
    load_model_weights(ckpt, chunks)  # QLoRA: layer by layer, quantised on arrival
    if plan is not None:
        plan.prepare(chunks)
    held = local_bytes(chunks) if plan else {"dense": sum(p.numel() * p.element_size() for c in chunks
                                                          for p in c.parameters()), "nf4": 0}
    print(json.dumps({"method": method, "before": before, "after_build": built, "after_load": _peak_bytes(),
                      "model_bytes": held["dense"] + held["nf4"], "device": "cuda" if env.cuda else "cpu"}))
    teardown()  # gloo aborts at interpreter exit if its group is left up


def measure_load(shape: tuple[int, int, int], rank: int) -> int:
    layers, hidden, ffn = shape
    tool_config("peft_memory.py --measure-shape", {"model.num_layers": layers, "model.hidden_size": hidden,
                                                   "model.ffn_hidden_size": ffn, "model.num_attention_heads": 8,
                                                   "model.num_query_groups": 2},
                {"model.num_layers": "LAYERS", "model.hidden_size": "HIDDEN", "model.ffn_hidden_size": "FFN"})
    overrides = [f"model.num_layers={layers}", f"model.hidden_size={hidden}", f"model.ffn_hidden_size={ffn}",
                 "model.num_attention_heads=8", "model.num_query_groups=2", "data.path=/unused"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # glibc: serve every allocation over 128 KB by mmap, so freed tensors leave the RSS
           # (else its adaptive threshold keeps freed heap pages and ru_maxrss overstates)
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "base"
        subprocess.run([sys.executable, "-m", "megatron_mft.checkpoint", "init", "--config",
                        str(ROOT / "examples" / "tiny_cpu.yaml"), "--out", str(ckpt)] + overrides,
                       check=True, env=env, cwd=ROOT, capture_output=True)
        print(f"shape: {layers} layers, hidden {hidden}, ffn {ffn}, 8 heads / 2 KV groups, vocab 2048, fp32 on CPU; "
              f"LoRA/QLoRA r={rank} on all four targets")
        print(f"{'method':<7} {'model held':>11} {'peak before':>12} {'peak after build':>17} {'peak after load':>16}")
        for method in ("none", "lora", "qlora"):
            out = subprocess.run([sys.executable, __file__, "--_child", method, str(ckpt), str(rank)] + overrides,
                                 check=True, env=env, cwd=ROOT, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            mb = 1e6
            print(f"{method:<7} {r['model_bytes'] / mb:9.1f}MB {r['before'] / mb:10.1f}MB {r['after_build'] / mb:15.1f}MB "
                  f"{r['after_load'] / mb:14.1f}MB  ({r['device']})")
        print("peaks are process-wide (CPU: ru_maxrss, including Python, torch and megatron-core; "
              "MALLOC_MMAP_THRESHOLD_=131072)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2], sys.argv[3], sys.argv[5:], int(sys.argv[4]))
        sys.exit(0)
    sys.exit(command(main)())
