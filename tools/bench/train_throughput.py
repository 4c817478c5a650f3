"""Training throughput of a preset (optionally with fewer layers): tokens/s, TFLOP/s per GPU, MFU;
or the engine against a plain Hugging Face training loop on the same model (``--compare-hf``).

    python tools/bench/train_throughput.py --preset codellama-34b --layers 4 --seq 4096   # one GPU
    python tools/bench/train_throughput.py                                                # CPU default
    python tools/bench/train_throughput.py --compare-hf --threads 1,2 --peft-modes none,lora

Default mode: real optimizer steps of the training engine (megatron schedules, DDP, Adam) on
synthetic packed rows (``--docs-per-row`` documents per row) with the device name.
Multi-GPU: launch under torchrun with --tp/--pp.

``--compare-hf``: the parent writes one random transformers ``LlamaForCausalLM`` of the preset's
architecture (``save_pretrained``) and starts two worker processes: the engine (weights loaded
from that folder by ``model.hf_init``'s loader, packed rows) and a plain PyTorch loop over the
same ``LlamaForCausalLM`` (``model(input_ids, labels=...)``, backward per micro batch, gradient
clipping, ``torch.optim.AdamW``; peft's LoRA for ``lora``). Both see the same token batches.
Trials rotate which timing runs first; each trial gives one ratio engine/HF (tokens/s over wall
time, and over the worker's process CPU time, the steadier figure on a shared machine), and the
median and range over trials are printed, per thread count and per mode. A third timing per trial runs
the engine on rows packed with several documents each (the MFT pack mode) on the same tokens.
Before timing, both workers report the loss of the same batch at the initial weights (the same
model built two ways must agree). ``--profile`` prints a torch.profiler table of one step of
each loop instead of the trials.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch


from megatron_mft.config import tool_config  # noqa: E402
from megatron_mft.config.base import choice_list, int_list, int_range  # noqa: E402
from megatron_mft.errors import UsageError, command  # noqa: E402

PEFT_METHODS = ("none", "lora", "qlora")
#: what the HF loop can apply too (it has no QLoRA): --compare-hf compares like with like
HF_PEFT_MODES = ("none", "lora")


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int_range(1), default=None, help="override num_layers (e.g. 4 of 34B's 48)")
    ap.add_argument("--seq", type=int_range(1), default=512)
    ap.add_argument("--micro-batch", type=int_range(1), default=2)
    ap.add_argument("--micro-batches", type=int_range(1), default=2, help="micro batches per step")
    ap.add_argument("--steps", type=int_range(1), default=4, help="measured steps (after 1 warm-up step); per trial with --compare-hf")
    ap.add_argument("--tp", type=int_range(1), default=1)
    ap.add_argument("--pp", type=int_range(1), default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--attention", default="auto", choices=["auto", "te", "flash", "sdpa"])
    ap.add_argument("--peft", default="none", choices=PEFT_METHODS)
    ap.add_argument("--lora-rank", type=int_range(1), default=64)
    ap.add_argument("--docs-per-row", type=int_range(1), default=1, help="documents packed per row (random lengths)")
    ap.add_argument("--json", help="also write the result here")
    cmp = ap.add_argument_group("--compare-hf")
    cmp.add_argument("--compare-hf", action="store_true", help="engine vs a plain transformers loop, alternating")
    cmp.add_argument("--threads", default="1,2", type=int_list(1), help="torch threads per worker, comma-separated")
    cmp.add_argument("--peft-modes", default="none,lora", type=choice_list(HF_PEFT_MODES),
                     help="comma-separated: none (full fine-tune), lora")
    cmp.add_argument("--trials", type=int_range(1), default=8, help="alternating paired trials per thread count and mode")
    cmp.add_argument("--packed-docs", type=int_range(1), default=4, help="documents per row of the packed engine timing")
    cmp.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per loop")
    cmp.add_argument("--worker", choices=["engine", "hf"], help=argparse.SUPPRESS)
    cmp.add_argument("--hf-dir", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- synthetic batches

def doc_lengths(seq: int, docs: int, g: torch.Generator) -> list[int]:
    """``docs`` random lengths (each >= 16) filling a row of ``seq`` tokens exactly."""
    if docs <= 1:
        return [seq]
    cuts = sorted(torch.randperm(seq // 16 - 1, generator=g)[:docs - 1].add(1).mul(16).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [seq])]


def micro_batch(tokens: torch.Tensor, docs: int, g: torch.Generator) -> dict:
    """The data contract's micro batch for ``tokens`` [b, s], rows split into ``docs`` documents;
    every position but a document's last takes loss (as a causal LM loss over each document)."""
    b, s = tokens.shape
    lengths = [doc_lengths(s, docs, g) for _ in range(b)]
    flat = [n for row in lengths for n in row]
    sample = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(flat)).reshape(b, s)
    pos = torch.cat([torch.arange(n) for n in flat]).reshape(b, s)
    last = torch.cat([torch.arange(n) == n - 1 for n in flat]).reshape(b, s)
    cu = torch.tensor([0] + flat).cumsum(0).to(torch.int32)
    return dict(tokens=tokens, labels=torch.where(last, 0, tokens.roll(-1, 1)), loss_mask=(~last).float(),
                task_ids=torch.zeros(b, s, dtype=torch.long), sample_ids=sample, position_ids=pos,
                cu_seqlens=cu, max_seqlen=max(flat))


def token_batches(args, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (args.micro_batch, args.seq), generator=g) for _ in range(args.micro_batches)]


# ---------------------------------------------------------------- the engine

#: the options' names in the training config's messages
OPTIONS = {"model.preset": "--preset", "model.num_layers": "--layers", "model.precision": "--precision",
           "model.recompute": "--recompute", "model.attention_backend": "--attention", "parallel.tp": "--tp",
           "parallel.pp": "--pp", "parallel.sp": "--sp", "data.seq_length": "--seq",
           "train.micro_batch_size": "--micro-batch", "peft.method": "--peft", "peft.rank": "--lora-rank"}


def _engine_settings(args) -> dict:
    over = {"model.preset": args.preset, "model.precision": args.precision, "model.recompute": args.recompute,
            "model.attention_backend": args.attention, "parallel.tp": args.tp, "parallel.pp": args.pp,
            "parallel.sp": args.sp, "data.path": "/synthetic", "data.seq_length": args.seq, "loss.mode": "token",
            "train.micro_batch_size": args.micro_batch, "train.warmup_steps": 0, "peft.method": args.peft}
    if args.peft != "none":
        over.update({"peft.rank": args.lora_rank, "peft.alpha": 2 * args.lora_rank})
    if args.layers:
        over["model.num_layers"] = args.layers
    return over


def _engine_overrides(args) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in _engine_settings(args).items()]


def check_options(args) -> None:
    """Refuse, before any model is built, what training would refuse (the training config's rules,
    in the options' names) and rows that cannot hold the documents asked for."""
    for mode in args.peft_modes if args.compare_hf else [args.peft]:
        tool_config("train_throughput.py", _engine_settings(argparse.Namespace(**{**vars(args), "peft": mode})),
                    OPTIONS)
    docs = {"--docs-per-row": args.docs_per_row, **({"--packed-docs": args.packed_docs} if args.compare_hf else {})}
    for name, n in docs.items():
        if n > 1 and n > args.seq // 16:
            raise UsageError(f"train_throughput.py: {name} {n}: a row of --seq {args.seq} tokens holds at most "
                             f"{max(args.seq // 16, 1)} (each at least 16 tokens)")


class Engine:
    """The training engine as the recipe builds it: (adapter spec,) GPTModel chunks, DDP, optimizer."""

    def __init__(self, args, hf_dir: str | None = None, total_steps: int = 1000):
        from megatron.core import parallel_state as ps

        from megatron_mft.compat import setup_runtime
        from megatron_mft.config import load_config
        from megatron_mft.model import build_model_chunks
        from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
        from megatron_mft.training.parallel import init_parallel
        from megatron_mft.training.step import StepContext, install_grad_finalizer

        self.env = env = setup_runtime()
        self.cfg = cfg = load_config(None, _engine_overrides(args))
        init_parallel(cfg.parallel, env, cfg.seed)
        self.dp = ps.get_data_parallel_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if env.cuda else torch.device("cpu")
        layer, plan = None, None
        if args.peft != "none":  # same order as the recipe: adapter spec, build, (load,) freeze/quantise
            from megatron_mft.peft import PeftPlan

            plan = PeftPlan(cfg.peft, env)
            layer = plan.layer_spec(cfg.model)
        self.raw = build_model_chunks(cfg.model, cfg.parallel, env, layer=layer)
        if hf_dir is not None:
            from megatron_mft.checkpoint.hf.load import load_hf_into_chunks

            load_hf_into_chunks(hf_dir, self.raw, cfg.model, cfg.parallel)
        if plan is not None:
            plan.prepare(self.raw)
        self.chunks = wrap_ddp(self.raw, cfg)
        install_grad_finalizer(self.chunks)
        self.opt = build_optimizer(self.chunks, cfg)
        self.sched = build_scheduler(self.opt, cfg, total_steps)
        self.ctx = StepContext(loss_cfg=cfg.loss, task_names=["bench"], device=self.device, packed=True)

    def step(self, batches: list[dict]) -> dict:
        from megatron_mft.training.step import train_step

        return train_step(self.chunks, self.opt, self.sched, batches, self.ctx)

    def initial_loss(self, tokens: torch.Tensor) -> float:
        """Mean next-token CE of one document per row (sbhd forward, no grad)."""
        model = self.raw[0]
        b, s = tokens.shape
        with torch.no_grad():
            model.eval()
            ce = model(tokens, torch.arange(s).expand(b, s), None, labels=tokens.roll(-1, 1))
            model.train()
        return ce[:, :-1].double().mean().item()


def run_default(args) -> None:
    eng = Engine(args, total_steps=args.steps + 1)
    from megatron_mft.model import kernels_line
    from megatron_mft.training.metrics import flop_count, peak_flops

    env, arch = eng.env, eng.cfg.model.arch()
    b, s = args.micro_batch, args.seq
    g = torch.Generator().manual_seed(0)
    batches = [micro_batch(t, args.docs_per_row, g) for t in token_batches(args, arch.vocab_size)]
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    eng.step(batches)  # warm-up
    if env.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = eng.step(batches)
    if env.cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    world = torch.distributed.get_world_size()
    tokens = b * s * args.micro_batches * eng.dp
    lengths = [int(e - a) for mb in batches for a, e in zip(mb["cu_seqlens"][:-1], mb["cu_seqlens"][1:])]
    flops = flop_count(arch, lengths * eng.dp, eng.cfg.peft, eng.cfg.model.recompute).model
    tflops = flops / dt / world / 1e12
    peak = peak_flops(env.device_name)
    result = {
        "device": env.device_name, "kernels": kernels_line(eng.raw, env, packed=True), "preset": args.preset,
        "layers": arch.num_layers, "seq": s, "micro_batch": b, "micro_batches": args.micro_batches,
        "docs_per_row": args.docs_per_row, "tp": args.tp, "pp": args.pp, "dp": eng.dp,
        "precision": str(eng.chunks[0].config.params_dtype), "peft": args.peft, "threads": torch.get_num_threads(),
        "step_s": dt, "tokens_per_s": tokens / dt, "tflops_per_gpu": tflops,
        "mfu": tflops * 1e12 / peak if peak else None, "loss": out["loss"],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if env.cuda else None,
    }
    if torch.distributed.get_rank() == 0:
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)


# ---------------------------------------------------------------- the plain transformers loop

def hf_config(args):
    """transformers' LlamaConfig of the preset's architecture: the config.json the export writes."""
    from transformers import LlamaConfig

    from megatron_mft.checkpoint.hf.families import LLAMA
    from megatron_mft.config import load_config

    return LlamaConfig(**LLAMA.hf_config(load_config(None, _engine_overrides(args)).model.arch(), "float32"))


class HFLoop:
    """What a user writes with transformers: forward with labels, backward, clip, AdamW."""

    def __init__(self, args, hf_dir: str):
        from transformers import LlamaForCausalLM

        from megatron_mft.config import load_config

        t = load_config(None, _engine_overrides(args)).train
        self.model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
        if args.peft == "lora":
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            self.model = get_peft_model(self.model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                               lora_dropout=0.0, target_modules=targets))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                     weight_decay=t.weight_decay)
        self.clip = t.clip_grad

    def step(self, batches: list[dict]) -> dict:
        loss_sum = 0.0
        for mb in batches:
            loss = self.model(input_ids=mb["tokens"], labels=mb["tokens"]).loss / len(batches)
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss_sum}

    def initial_loss(self, tokens: torch.Tensor) -> float:
        with torch.no_grad():
            self.model.eval()
            loss = self.model(input_ids=tokens, labels=tokens).loss
            self.model.train()
        return loss.item()


# ---------------------------------------------------------------- worker process

def profile_table(step, batches, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    step(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step(batches)
        dt = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)
    return f"step {dt * 1e3:.0f} ms (profiled)\n{table}"


def worker(args) -> None:
    """Answer JSON commands on stdin: {"threads", "steps", "kind": single|packed} -> seconds."""
    import warnings

    warnings.filterwarnings("ignore")  # library deprecation chatter, once per process
    loop = Engine(args, hf_dir=args.hf_dir) if args.worker == "engine" else HFLoop(args, args.hf_dir)
    vocab = hf_config(args).vocab_size
    tokens = token_batches(args, vocab)
    g = torch.Generator().manual_seed(0)
    batches = {"single": [micro_batch(t, 1, g) for t in tokens],
               "packed": [micro_batch(t, args.packed_docs, g) for t in tokens]}
    warm: set = set()
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not mix with the replies
    out.write(json.dumps({"ready": True, "initial_loss": loop.initial_loss(tokens[0])}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        torch.set_num_threads(cmd["threads"])
        if cmd.get("profile"):
            reply = {"table": profile_table(loop.step, batches[cmd["kind"]])}
        else:
            key = (cmd["threads"], cmd["kind"])
            if key not in warm:
                loop.step(batches[cmd["kind"]])
                warm.add(key)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(cmd["steps"]):
                loss = loop.step(batches[cmd["kind"]])["loss"]
            reply = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "loss": float(loss)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---------------------------------------------------------------- parent

class _Proc:
    """A worker process speaking one JSON line per command."""

    def __init__(self, kind: str, argv: list[str], hf_dir: str, peft: str):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", kind, "--hf-dir", hf_dir, "--peft", peft]
        # one process whatever launched the bench: it serves its own store (launch/env.py)
        env = {**os.environ, "MFT_LAUNCHER": "single", "OMP_NUM_THREADS": "1"}
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.p.args} exited with {self.p.wait()}")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def machine_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return (f"machine: {platform.node()} | {cpu} x {os.cpu_count()} | load avg {load} | Python "
            f"{platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__}")


def median_ci(xs: list[float], draws: int = 2000) -> tuple[float, float]:
    """Bootstrap 95% interval of the median (seeded: the same trials give the same interval)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def _spread(xs: list[float]) -> str:
    lo, hi = median_ci(xs)
    return (f"median {statistics.median(xs):.2f} (95% CI of the median {lo:.2f}-{hi:.2f}; range "
            f"{min(xs):.2f}-{max(xs):.2f}, n={len(xs)})")


def compare_hf(args, argv: list[str]) -> None:
    threads, modes = list(args.threads), args.peft_modes
    tokens_per_step = args.micro_batch * args.seq * args.micro_batches
    print(machine_line())
    print(f"preset {args.preset}, seq {args.seq}, micro batch {args.micro_batch}, {args.micro_batches} micro "
          f"batches/step, {args.steps} steps per timing, fp32, LoRA r={args.lora_rank}; engine rows: 1 document "
          f"(vs HF) and {args.packed_docs} documents (packed)", flush=True)
    summary = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(hf_config(args)).save_pretrained(hf_dir)
        for mode in modes:
            procs = {k: _Proc(k, argv, hf_dir, mode) for k in ("engine", "hf")}
            try:
                l_e, l_h = procs["engine"].hello["initial_loss"], procs["hf"].hello["initial_loss"]
                print(f"\n[{mode}] same model both ways: initial loss engine {l_e:.6f}, transformers {l_h:.6f} "
                      f"(|diff| {abs(l_e - l_h):.1e})")
                if abs(l_e - l_h) > 1e-4 * abs(l_h):
                    raise SystemExit("the two models disagree: not the same architecture/weights")
                for n in threads:
                    if args.profile:
                        for k, kind in (("engine", "single"), ("engine", "packed"), ("hf", "single")):
                            print(f"\n--- profile: {k} ({kind}), {n} thread(s) ---")
                            print(procs[k].ask(threads=n, kind=kind, profile=True)["table"])
                        continue
                    runs = []
                    for trial in range(args.trials):
                        order = [("engine", "single"), ("engine", "packed"), ("hf", "single")]
                        order = order[trial % 3:] + order[:trial % 3]  # rotate who runs first
                        sec, cpu = {}, {}
                        for k, kind in order:
                            r = procs[k].ask(threads=n, kind=kind, steps=args.steps)
                            sec[(k, kind)], cpu[(k, kind)] = r["seconds"], r["cpu_seconds"]
                        runs.append((sec, cpu))
                    tps = {key: [tokens_per_step * args.steps / s[key] for s, _ in runs] for key in runs[0][0]}
                    ratio = [s[("hf", "single")] / s[("engine", "single")] for s, _ in runs]
                    cpu_ratio = [c[("hf", "single")] / c[("engine", "single")] for _, c in runs]
                    packed = [s[("engine", "packed")] / s[("engine", "single")] - 1 for s, _ in runs]
                    print(f"  {n} thread(s): tokens/s (wall) engine {statistics.median(tps[('engine', 'single')]):.0f}, "
                          f"transformers {statistics.median(tps[('hf', 'single')]):.0f}, engine packed "
                          f"{statistics.median(tps[('engine', 'packed')]):.0f}")
                    print(f"      engine/transformers tokens/s ratio, wall {_spread(ratio)}")
                    print(f"      engine/transformers tokens/s ratio, process CPU time {_spread(cpu_ratio)}")
                    print(f"      packed ({args.packed_docs} docs/row) cost over 1 doc/row, wall {_spread(packed)}")
                    summary[f"{mode}/{n}t"] = {"ratio_median": round(statistics.median(ratio), 3),
                                               "ratio_ci95": [round(x, 3) for x in median_ci(ratio)],
                                               "ratio_range": [round(min(ratio), 3), round(max(ratio), 3)],
                                               "ratios": [round(x, 4) for x in ratio],
                                               "cpu_ratio_median": round(statistics.median(cpu_ratio), 3),
                                               "cpu_ratio_range": [round(min(cpu_ratio), 3), round(max(cpu_ratio), 3)],
                                               "packed_cost_median": round(statistics.median(packed), 3),
                                               "engine_tps": round(statistics.median(tps[('engine', 'single')])),
                                               "hf_tps": round(statistics.median(tps[('hf', 'single')]))}
            finally:
                for p in procs.values():
                    p.close()
    print("\nmachine after: load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if summary:
        print("summary: " + json.dumps(summary))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)


def main() -> None:
    args = _args()
    check_options(args)
    if args.worker:
        worker(args)
    elif args.compare_hf:
        passthrough = [a for a in sys.argv[1:] if a not in ("--compare-hf", "--profile")]
        compare_hf(args, passthrough)
    else:
        run_default(args)


if __name__ == "__main__":
    from megatron_mft.launch.quiet import quiet_known_warnings

    quiet_known_warnings()  # before megatron's imports: its missing-kernel warnings, in every worker
    from megatron_mft.training.parallel import teardown

    try:
        code = command(lambda argv: main() or 0)()
    finally:  # the engine's init_parallel started a gloo group: it aborts at interpreter exit if left up
        teardown()
    sys.exit(code)
