"""The GPU checks of issue 12, one subcommand per process (tests/gpu/run_gpu_checks.sh runs them).

    python tests/gpu/gpu_checks.py placement --out DIR     # every variant built as the recipe does,
                                                           # all tensors on cuda, one packed + one
                                                           # dynamic step each (real kernels)
    python tests/gpu/gpu_checks.py isolation --out DIR     # packed documents == each alone, on CUDA kernels
    python tests/gpu/gpu_checks.py hf-parity --out DIR     # logits vs transformers on CUDA, fp32 and bf16
    python tests/gpu/gpu_checks.py wgrad --out DIR         # weight gradient into fp32 main_grad vs float64
    python tests/gpu/gpu_checks.py bench --peft lora --batching packed --out DIR
                                                           # CodeLlama-34B-shaped layers: tokens/s,
                                                           # model/hardware TFLOP/s, MFU, peak memory
    python tests/gpu/gpu_checks.py hf-bench --out DIR      # the same layers and document lengths through a
                                                           # plain transformers loop (the user's baseline)
    python tests/gpu/gpu_checks.py summary --out DIR       # ratios + a markdown table for docs/performance.md

``bench --wgrad unfused`` forms the weight gradient in bf16 and then adds it (the A/B of the one-GEMM
form in training/optimizer.py). ``bench --profile`` also writes ``profile_<peft>_<batching>.txt``: one step under torch.profiler,
kernels by device time, and how much of the step's wall time the device was busy.

``--dry-run``: the same code on the CPU with tiny shapes (checks this script without a GPU;
its figures mean nothing). Each subcommand writes ``DIR/<name>.json`` and exits 1 when its
check fails.

HF parity (a random 4-layer Llama, 2 x 256 tokens; its logits reach about 90): the truth is
transformers' forward in float64 on the device. fp32: megatron's logits may be no further from it
than twice transformers' own fp32 run is (float32's error grows with the logits' size: 1.1e-3 at
90 for both, bit-identical to each other, on the CPU). bf16: no further than 1.5 x transformers'
own bf16 run plus 0.02 (bf16 keeps 8 bits of mantissa), and its argmax must agree with float64's
on at least as many tokens as transformers' bf16 run, less 5 points (at logits of 90 the
distance alone would let a broken bf16 path through).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # test_hf_fixtures.make_hf_model

#: CodeLlama-34B-shaped layers (issue 12): 4 of its 48 layers at its full width, seq 4096, bf16
BENCH = dict(preset="codellama-34b", layers=4, seq=4096, docs=[1536, 1024, 1024, 512], micro_batches=2,
             steps=3, lora_rank=64)
DRY_BENCH = dict(preset="tiny", layers=2, seq=256, docs=[96, 64, 64, 32], micro_batches=2, steps=1, lora_rank=8)
QLORA_OVER_LORA_TARGET = 1.3


# ---------------------------------------------------------------- set-up shared by the checks

def runtime():
    """Environment, one-process group (NCCL on CUDA) and the device tensors must live on."""
    from megatron_mft.compat import setup_runtime

    env = setup_runtime()
    if env.cuda:
        torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():  # a store on a port the kernel assigns (launch/env.py)
        from megatron_mft.launch.env import DistEnv, init_distributed

        init_distributed(DistEnv.single(), backend="nccl" if env.cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if env.cuda else torch.device("cpu")
    return env, device


def load_cfg(overrides: list[str]):
    from megatron_mft.config import load_config

    return load_config(None, ["data.path=/synthetic", "loss.mode=token", "train.warmup_steps=0", *overrides])


def build_engine(cfg, env):
    """What Recipe.setup does to the model (base weights aside): adapter spec, GPTModel chunks,
    PEFT prepare (freeze, adapters, NF4), megatron DDP, optimizer, scheduler."""
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_mft.training.parallel import init_parallel
    from megatron_mft.training.step import install_grad_finalizer

    init_parallel(cfg.parallel, env, cfg.seed)
    layer, plan = None, None
    if cfg.peft.method != "none":
        from megatron_mft.peft import PeftPlan

        plan = PeftPlan(cfg.peft, env)
        layer = plan.layer_spec(cfg.model)
    raw = build_model_chunks(cfg.model, cfg.parallel, env, layer=layer)
    if plan is not None:
        plan.prepare(raw)
    chunks = wrap_ddp(raw, cfg)
    install_grad_finalizer(chunks)
    opt = build_optimizer(chunks, cfg)
    return raw, chunks, opt, build_scheduler(opt, cfg, 1000)


def micro_batches(docs: list[int], packed: bool, n: int, vocab: int, seed: int = 0,
                  joined: bool = False) -> list[dict]:
    """``n`` micro batches through the real collator: packed = one row holding every document
    (THD); dynamic = one document per row, padded to the longest (SBHD). Same tokens either way.
    ``joined``: the documents run as one (a packed row without isolation: the negative control)."""
    import numpy as np

    from megatron_mft.data.collate import Row, collate, row_width

    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        samples = [(g.integers(3, vocab, size=d), np.ones(d, dtype=np.uint8), 0) for d in docs]
        if joined:
            samples = [(np.concatenate([t for t, _, _ in samples]), np.ones(sum(docs), dtype=np.uint8), 0)]
        rows = [Row.of(samples)] if packed or joined else [Row.of([s]) for s in samples]
        out.append(collate(rows, row_width(rows, multiple=8), pad_id=0))
    return out


def write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str), flush=True)


def release() -> None:
    """Between variants in one process: megatron's parallel state down, freed memory returned
    (the caller drops its references to the model and optimizer first)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- placement

def check_placement(args) -> bool:
    """Every variant the recipes build, built as on CUDA (use_cpu_initialization=False), every
    tensor on the device (the recipe's own check), then one packed and one dynamic step."""
    from megatron_mft.model import kernels_line, misplaced_tensors
    from megatron_mft.model.placement import model_tensors
    from megatron_mft.training.step import StepContext, train_step

    env, device = runtime()
    backends = ["sdpa"] + (["flash"] if env.flash_attn else []) + (["te"] if env.te else [])
    results, ok = [], True
    for method in ("none", "lora", "qlora"):
        for backend in backends:
            cfg = load_cfg(["model.num_layers=2", "model.precision=bf16" if env.cuda else "model.precision=fp32",
                            f"model.attention_backend={backend}", f"peft.method={method}", "peft.rank=8",
                            "train.micro_batch_size=4"])
            rec = {"method": method, "backend": backend}
            try:
                raw, chunks, opt, sched = build_engine(cfg, env)
                rec["use_cpu_initialization"] = raw[0].config.use_cpu_initialization
                rec["misplaced"] = [f"{n} on {d}" for n, d in misplaced_tensors(chunks, device)]
                rec["tensors_checked"] = sum(1 for _ in model_tensors(chunks))
                for packed in (True, False):
                    ctx = StepContext(loss_cfg=cfg.loss, task_names=["t"], device=device, packed=packed)
                    mbs = micro_batches([48, 32, 32, 16], packed, 2, cfg.model.arch().vocab_size)
                    out = train_step(chunks, opt, sched, mbs, ctx)
                    rec[f"loss_{'packed' if packed else 'dynamic'}"] = out["loss"]
                    rec[f"kernels_{'packed' if packed else 'dynamic'}"] = kernels_line(raw, env, packed=packed)
                good = (not rec["misplaced"] and rec["use_cpu_initialization"] is (not env.cuda)
                        and all(math.isfinite(rec[k]) for k in ("loss_packed", "loss_dynamic")))
                del raw, chunks, opt, sched
                release()
            except Exception as e:  # noqa: BLE001 - every variant is reported
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc(limit=-8)
                good = False
                release()
            rec["ok"] = good
            ok &= good
            results.append(rec)
    write(Path(args.out), "placement", {"device": env.device_name, "ok": ok, "variants": results})
    return ok


# ---------------------------------------------------------------- attention isolation

def check_isolation(args) -> bool:
    """Packed documents attend only within themselves on the device's kernels: at the same weights
    every document's per-token CE in a packed row equals the same document alone in a padded row
    (fp32 within 1e-3; bf16, whose packed and padded rows may run different kernels, within a
    quarter of what running the documents as one changes: the negative control, which must move
    the CE for the check to prove anything). Positions whose label is inside their document only."""
    from megatron_mft.training.step import StepContext, _ce_only_loss_func, run_schedule

    env, device = runtime()
    docs = [48, 32, 32, 16]
    result, ok = {"device": env.device_name, "docs": docs}, True
    for precision in ("fp32", "bf16") if env.cuda else ("fp32",):
        cfg = load_cfg(["model.num_layers=2", f"model.precision={precision}", "model.attention_backend=sdpa",
                        "train.micro_batch_size=4"])
        raw, chunks, opt, sched = build_engine(cfg, env)
        vocab = cfg.model.arch().vocab_size
        ce = {}
        for layout in ("packed", "dynamic", "joined"):
            mbs = micro_batches(docs, layout == "packed", 1, vocab, joined=layout == "joined")
            ctx = StepContext(loss_cfg=cfg.loss, task_names=["t"], device=device, packed=layout != "dynamic")
            with torch.no_grad():
                token_ce = run_schedule(chunks, mbs, ctx, _ce_only_loss_func, forward_only=True)[0]["token_ce"]
            token_ce, starts = token_ce.double().cpu(), [sum(docs[:i]) for i in range(len(docs))]
            ce[layout] = torch.cat([token_ce[i, :n - 1] if layout == "dynamic" else token_ce[0, o:o + n - 1]
                                    for i, (o, n) in enumerate(zip(starts, docs))])
        isolated = (ce["packed"] - ce["dynamic"]).abs().max().item()
        leak = (ce["joined"] - ce["dynamic"]).abs().max().item()
        tol = 1e-3 if precision == "fp32" else 0.25 * leak
        good = isolated <= tol and leak > 0.01  # the control must move the CE, or the check proves nothing
        result[precision] = {"packed_vs_dynamic_max_abs": isolated, "joined_vs_dynamic_max_abs": leak, "tol": tol,
                             "ce_mean": ce["dynamic"].mean().item(), "ok": good}
        ok &= good
        del raw, chunks, opt, sched
        release()
    result["ok"] = ok
    write(Path(args.out), "isolation", result)
    return ok


# ---------------------------------------------------------------- HF parity

def check_hf_parity(args) -> bool:
    """Random Llama (transformers) -> model.hf_init loader -> megatron logits on the device,
    against transformers' logits on the same device, fp32 and bf16."""
    import tempfile

    from test_hf_fixtures import make_hf_model
    from transformers import AutoModelForCausalLM

    from megatron_mft.checkpoint.hf.verify import build_megatron, megatron_logits, random_tokens
    from megatron_mft.config import ParallelConfig
    from megatron_mft.training.parallel import init_parallel

    env, device = runtime()
    shape = (dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2) if args.dry_run else
             dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096))
    tokens = random_tokens(shape["vocab_size"], 2, 64 if args.dry_run else 256, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_model(Path(tmp) / "hf", seed=5, max_shard_size="2GB", **shape)

        def hf(dtype):
            # cast after loading: the from_pretrained dtype keyword differs across transformers versions
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="sdpa")
            with torch.no_grad():
                model = model.to(device=device, dtype=dtype).eval()
                logits = model(input_ids=tokens.to(device)).logits.cpu()
            del model
            return logits

        def ours(precision):
            init_parallel(ParallelConfig(), env, 0)
            chunks, cfg = build_megatron(hf_dir, None, ParallelConfig(), env, precision=precision)
            logits = megatron_logits(chunks, tokens, cfg.arch().vocab_size)
            del chunks
            release()
            return logits

        ref64, ref32, ref16 = hf(torch.float64), hf(torch.float32), hf(torch.bfloat16)
        got32, got16 = ours("fp32"), ours("bf16")
    ref64 = ref64.double()

    def err(x):
        return (x.double() - ref64).abs().max().item()

    tol32, tol16 = 2 * err(ref32), 1.5 * err(ref16) + 0.02
    result = {"device": env.device_name, "tokens": list(tokens.shape), "max_abs_logit": ref64.abs().max().item(),
              "truth": "transformers, float64, same device",
              "fp32_max_abs_err": err(got32), "hf_fp32_max_abs_err": err(ref32), "fp32_tol": tol32,
              "fp32_max_abs_diff_vs_hf_fp32": (got32 - ref32).abs().max().item(),
              "bf16_max_abs_err": err(got16), "hf_bf16_max_abs_err": err(ref16), "bf16_tol": tol16,
              "bf16_argmax_agreement": (got16.argmax(-1) == ref64.argmax(-1)).float().mean().item(),
              "hf_bf16_argmax_agreement": (ref16.argmax(-1) == ref64.argmax(-1)).float().mean().item()}
    result["ok"] = (ref64.abs().max().item() > 1.0 and err(got32) <= tol32 and err(got16) <= tol16
                    and result["bf16_argmax_agreement"] >= result["hf_bf16_argmax_agreement"] - 0.05)
    write(Path(args.out), "hf_parity", result)
    return result["ok"]


# ---------------------------------------------------------------- throughput

def bench(args) -> bool:
    """Real optimizer steps of the engine on CodeLlama-34B-shaped layers: the same documents
    packed (one THD row per micro batch) or dynamic (one document per row, padded)."""
    from megatron_mft.model import kernels_line
    from megatron_mft.training.metrics import flop_count, peak_flops
    from megatron_mft.training.step import StepContext, train_step

    b = DRY_BENCH if args.dry_run else BENCH
    env, device = runtime()
    packed = args.batching == "packed"
    docs = b["docs"]
    cfg = load_cfg([f"model.preset={b['preset']}", f"model.num_layers={b['layers']}",
                    "model.precision=bf16" if env.cuda else "model.precision=fp32",
                    f"data.seq_length={b['seq']}", f"data.batching={args.batching}",
                    f"train.micro_batch_size={1 if packed else len(docs)}",
                    f"peft.method={args.peft}",
                    *([f"peft.rank={b['lora_rank']}", f"peft.alpha={2 * b['lora_rank']}"] if args.peft != "none" else [])])
    arch = cfg.model.arch()
    raw, chunks, opt, sched = build_engine(cfg, env)
    if args.wgrad == "unfused":  # the A/B: the weight gradient in bf16, then added into main_grad
        from types import SimpleNamespace

        from megatron.core.tensor_parallel import layers

        def unfused(total_input, grad_output, main_grad):
            main_grad.add_(grad_output.t().mm(total_input))

        layers.fused_weight_gradient_mlp_cuda = SimpleNamespace(wgrad_gemm_accum_fp32=unfused,
                                                                wgrad_gemm_accum_fp16=unfused)
    ctx = StepContext(loss_cfg=cfg.loss, task_names=["bench"], device=device, packed=packed)
    mbs = micro_batches(docs, packed, b["micro_batches"], arch.vocab_size)
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    out = train_step(chunks, opt, sched, mbs, ctx)  # warm-up (allocator, kernels' autotuning)
    if env.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(b["steps"]):
        out = train_step(chunks, opt, sched, mbs, ctx)
    if env.cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / b["steps"]
    lengths = docs * b["micro_batches"]
    flops = flop_count(arch, lengths, cfg.peft if args.peft != "none" else None, cfg.model.recompute)
    peak = peak_flops(env.device_name)
    result = {
        "device": env.device_name, "torch": torch.__version__, "kernels": kernels_line(raw, env, packed=packed),
        "preset": b["preset"], "layers": arch.num_layers, "hidden": arch.hidden_size, "seq": b["seq"],
        "docs_per_micro_batch": docs, "micro_batches": b["micro_batches"], "batching": args.batching,
        "peft": args.peft, "lora_rank": b["lora_rank"] if args.peft != "none" else None,
        "precision": str(raw[0].config.params_dtype), "recompute": cfg.model.recompute,
        "real_tokens_per_step": sum(lengths),
        "padded_tokens_per_step": sum(int(mb["tokens"].numel()) for mb in mbs),
        "step_s": dt, "tokens_per_s": sum(lengths) / dt,
        "model_tflops_per_s": flops.model / dt / 1e12, "hardware_tflops_per_s": flops.hardware / dt / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "mfu": flops.model / dt / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if env.cuda else None,
        "loss": out["loss"],
    }
    result["ok"] = math.isfinite(out["loss"])
    result["wgrad"] = args.wgrad
    name = f"{args.peft}_{args.batching}" + ("_unfused_wgrad" if args.wgrad == "unfused" else "")
    write(Path(args.out), f"bench_{name}", result)
    if args.profile:
        profile_step(lambda: train_step(chunks, opt, sched, mbs, ctx), env.cuda,
                     Path(args.out) / f"profile_{name}.txt")
    return result["ok"]


def profile_step(step, cuda: bool, path: Path, rows: int = 30) -> None:
    """One step under torch.profiler: the kernels by device time and the device's busy share of
    the step's wall time (what is left is host overhead the GPU waits for)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy_us = _device_busy_us(prof.events()) if cuda else None
    head = f"step {wall * 1e3:.1f} ms under the profiler"
    if busy_us is not None:
        head += f"; device busy {busy_us / 1e3:.1f} ms ({100 * busy_us / 1e6 / wall:.0f}% of wall)"
    try:
        table = events.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    except Exception as e:  # noqa: BLE001 - a profiler API difference must not lose the figures above
        table = f"(table unavailable: {type(e).__name__}: {e})"
    path.write_text(head + "\n" + table + "\n")
    print(head, flush=True)


def _device_busy_us(events) -> float:
    """Microseconds in which at least one kernel or device copy ran (the union of their intervals:
    overlapping streams count once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -math.inf
    for a, b in spans:
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return busy


# ---------------------------------------------------------------- weight-gradient accumulation

def check_wgrad(args) -> bool:
    """The weight gradient accumulated into float32 main_grad (training/optimizer.py) on the device,
    at a 34B MLP shape with bf16 operands, against float64: no further from the truth than the
    bf16 product followed by an add (megatron's path without apex), and the product is there."""
    from megatron_mft.training.optimizer import _wgrad_gemm_accum

    env, device = runtime()
    dtype = torch.bfloat16 if env.cuda else torch.float32
    tokens, d_in, d_out = (4096, 8192, 2816) if not args.dry_run else (256, 64, 96)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(device, dtype)
    dy = torch.randn(tokens, d_out, generator=g).to(device, dtype)
    main0 = torch.randn(d_out, d_in, generator=g).to(device)
    truth = main0.double() + dy.double().t() @ x.double()
    fused = main0.clone()
    _wgrad_gemm_accum(x, dy, fused)
    unfused = main0.clone()
    unfused.add_(dy.t().mm(x))
    err = lambda t: (t.double() - truth).abs().max().item()  # noqa: E731
    result = {"device": env.device_name, "shape": [tokens, d_in, d_out], "dtype": str(dtype),
              "fused_max_abs_err": err(fused), "unfused_max_abs_err": err(unfused),
              "product_max_abs": (truth - main0.double()).abs().max().item()}
    result["ok"] = (result["fused_max_abs_err"] <= result["unfused_max_abs_err"] * 1.01 + 1e-6
                    and result["fused_max_abs_err"] < 1e-2 * result["product_max_abs"])
    write(Path(args.out), "wgrad", result)
    return result["ok"]


def check_oom(args) -> bool:
    """A real out-of-memory error on the device (more than the card holds; the CPU's allocator in a
    dry run) is recognised, and the trainer's message keeps torch's figures: the text the CPU tests
    take from a copy of torch's wording is the device's own."""
    from megatron_mft.errors import is_out_of_memory
    from megatron_mft.training.oom import out_of_memory_error

    env, device = runtime()
    size = (torch.cuda.get_device_properties(device).total_memory * 2) if env.cuda else 2**50
    try:
        torch.empty(size, dtype=torch.uint8, device=device)
        error = None
    except Exception as e:  # noqa: BLE001 - what torch raises is the point
        error = e
    message = str(out_of_memory_error(error, load_cfg([]), "step 1")) if error is not None else ""
    first = message.splitlines()[0] if message else ""
    want = "out of GPU memory during step 1: CUDA out of memory. Tried to allocate" if env.cuda else \
        "out of host memory during step 1: DefaultCPUAllocator: can't allocate memory"
    result = {"device": env.device_name, "raised": type(error).__name__, "recognised": error is not None and
              is_out_of_memory(error), "first_line": first, "torch_text": str(error)[:600]}
    if env.cuda:  # the allocator is usable after the failure
        torch.cuda.empty_cache()
        result["after"] = float(torch.ones(1024, device=device).sum())
    result["ok"] = result["recognised"] and first.startswith(want) and "See documentation" not in message
    write(Path(args.out), "oom", result)
    return result["ok"]


# ---------------------------------------------------------------- the user's baseline: a plain transformers loop

def hf_bench(args) -> bool:
    """The bench's layers and document lengths (its own random tokens) through what a user writes
    with transformers: the same architecture as ``LlamaForCausalLM`` (bf16, SDPA), one document per
    row padded to the longest (transformers' usual batching), forward with labels, backward,
    clipping, fused AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_mft.checkpoint.hf.families import LLAMA
    from megatron_mft.training.metrics import flop_count, peak_flops

    b = DRY_BENCH if args.dry_run else BENCH
    env, device = runtime()
    cfg = load_cfg([f"model.preset={b['preset']}", f"model.num_layers={b['layers']}", f"data.seq_length={b['seq']}"])
    a, t = cfg.model.arch(), cfg.train
    dtype = torch.bfloat16 if env.cuda else torch.float32
    hf_cfg = LlamaConfig(**LLAMA.hf_config(a, str(dtype).removeprefix("torch.")))  # the config.json export writes
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).to(dtype).train()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=env.cuda)
    docs = b["docs"]
    g = torch.Generator().manual_seed(0)
    width = max(docs)
    batches = []
    for _ in range(b["micro_batches"]):
        ids = torch.zeros(len(docs), width, dtype=torch.long)
        mask = torch.zeros(len(docs), width, dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, :d] = torch.randint(3, a.vocab_size, (d,), generator=g)
            mask[i, :d] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()})

    def step() -> float:
        total = 0.0
        for mb in batches:
            loss = model(**mb).loss / len(batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total)

    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    if env.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(b["steps"]):
        loss = step()
    if env.cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / b["steps"]
    lengths = docs * b["micro_batches"]
    flops = flop_count(a, lengths, None, "none")
    peak = peak_flops(env.device_name)
    result = {"device": env.device_name, "torch": torch.__version__, "loop": "transformers LlamaForCausalLM, sdpa, "
              "padded rows, fused AdamW", "preset": b["preset"], "layers": a.num_layers, "seq": b["seq"],
              "docs_per_micro_batch": docs, "micro_batches": b["micro_batches"], "precision": str(dtype),
              "real_tokens_per_step": sum(lengths), "padded_tokens_per_step": len(docs) * width * b["micro_batches"],
              "step_s": dt, "tokens_per_s": sum(lengths) / dt, "model_tflops_per_s": flops.model / dt / 1e12,
              "mfu": flops.model / dt / peak if peak else None,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if env.cuda else None, "loss": loss}
    result["ok"] = math.isfinite(loss)
    write(Path(args.out), "hf_loop", result)
    return result["ok"]


# ---------------------------------------------------------------- summary

def summary(args) -> bool:
    """Ratios across the bench runs and a markdown table (for docs/performance.md)."""
    out = Path(args.out)
    runs = {p.stem[len("bench_"):]: json.loads(p.read_text()) for p in sorted(out.glob("bench_*.json"))}
    checks = {n: json.loads((out / f"{n}.json").read_text()).get("ok") if (out / f"{n}.json").is_file() else None
              for n in ("placement", "isolation", "hf_parity", "wgrad")}
    res = {"checks": checks, "runs": sorted(runs)}
    if "qlora_packed" in runs and "lora_packed" in runs:
        r = runs["qlora_packed"]["step_s"] / runs["lora_packed"]["step_s"]
        res.update(qlora_over_lora_step_time=r, qlora_over_lora_target=QLORA_OVER_LORA_TARGET,
                   qlora_over_lora_within_target=r <= QLORA_OVER_LORA_TARGET)
    hf_loop = out / "hf_loop.json"
    if hf_loop.is_file():
        hf = json.loads(hf_loop.read_text())
        for name in ("none_packed", "none_dynamic"):
            if name in runs:
                res[f"engine_{name}_over_hf_loop_tokens_per_s"] = runs[name]["tokens_per_s"] / hf["tokens_per_s"]
    for method in ("none", "lora", "qlora"):
        if f"{method}_packed" in runs and f"{method}_dynamic" in runs:
            res[f"{method}_packed_over_dynamic_tokens_per_s"] = (runs[f"{method}_packed"]["tokens_per_s"]
                                                                 / runs[f"{method}_dynamic"]["tokens_per_s"])
    lines = ["| run | step s | tokens/s | model TFLOP/s | hardware TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['model_tflops_per_s']:.1f} | "
                     f"{r['hardware_tflops_per_s']:.1f} | {mfu} | {mem} |")
    if hf_loop.is_file():
        mfu = f"{100 * hf['mfu']:.1f}%" if hf.get("mfu") is not None else "-"
        mem = f"{hf['peak_mem_gib']:.1f}" if hf.get("peak_mem_gib") is not None else "-"
        lines.append(f"| transformers loop (padded rows) | {hf['step_s']:.3f} | {hf['tokens_per_s']:.0f} | "
                     f"{hf['model_tflops_per_s']:.1f} | - | {mfu} | {mem} |")
    if runs:
        first = next(iter(runs.values()))
        kernels = sorted({f"{r['batching']}: {r['kernels'].split(' kernels: ', 1)[-1]}" for r in runs.values()})
        lines.insert(0, f"{first['device']}, torch {first['torch']}, {first['preset']} x {first['layers']} layers, "
                        f"seq {first['seq']}, {first['precision']}; kernels, {'; '.join(kernels)}\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if "none_packed" in runs and "none_packed_unfused_wgrad" in runs:
        res["fused_over_unfused_wgrad_tokens_per_s"] = (runs["none_packed"]["tokens_per_s"]
                                                        / runs["none_packed_unfused_wgrad"]["tokens_per_s"])
    res["ok"] = all(v is not False for v in checks.values()) and res.get("qlora_over_lora_within_target", True)
    write(out, "summary", res)
    print("\n".join(lines))
    return res["ok"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=["placement", "isolation", "hf-parity", "wgrad", "oom", "bench", "hf-bench",
                                      "summary"])
    ap.add_argument("--out", required=True, help="folder for <check>.json")
    ap.add_argument("--peft", default="none", choices=["none", "lora", "qlora"])
    ap.add_argument("--batching", default="packed", choices=["packed", "dynamic"])
    ap.add_argument("--profile", action="store_true", help="bench: also profile one step")
    ap.add_argument("--wgrad", default="fused", choices=["fused", "unfused"],
                    help="bench: unfused = bf16 weight gradient then add (the A/B of training/optimizer.py)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: these are GPU checks (use --dry-run to exercise the script on the CPU)",
              file=sys.stderr)
        return 2
    fn = {"placement": check_placement, "isolation": check_isolation, "hf-parity": check_hf_parity, "wgrad": check_wgrad, "oom": check_oom, "bench": bench,
          "hf-bench": hf_bench, "summary": summary}[args.check]
    try:
        return 0 if fn(args) else 1
    finally:  # a process group left up aborts at interpreter exit (gloo) or warns (NCCL)
        release()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
