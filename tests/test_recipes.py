"""Every shipped recipe loads and validates; the cluster recipes' headers state GPUs, memory and
FLOPs, and every figure they print equals what the estimator / FLOPs formula computes for that
recipe, to the printed precision."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from megatron_mft.config import PRESETS, load_config
from megatron_mft.peft.memory import GB
from megatron_mft.training.metrics import PEAK_BF16_FLOPS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from peft_memory import build_parser, estimates  # noqa: E402
from step_flops import step_flops  # noqa: E402

RECIPES = sorted((ROOT / "examples").glob("*.yaml"))
FULL = ["codellama34b_full.yaml", "codellama34b_pretrain.yaml", "starcoder2_15b_full.yaml"]
PEFT = ["codellama34b_lora.yaml", "codellama34b_qlora.yaml", "llama2_70b_qlora.yaml", "qwen25_coder_32b_lora.yaml",
        "deepseek_coder_33b_qlora.yaml", "llama31_70b_qlora.yaml", "mixtral_8x7b_qlora.yaml",
        "qwen3_coder_30b_a3b_lora.yaml"]
LONG_CONTEXT = ["codellama34b_lora_32k.yaml", "llama31_70b_qlora_64k.yaml"]  # context parallelism (issue 18)
PEFT += LONG_CONTEXT
CLUSTER = FULL + PEFT
OVERHEAD_GB = 4  # "~4 GB" of CUDA context, NCCL buffers and allocator slack, as the headers say


def header(name: str) -> str:
    """The comment header as one line: '#' and shell line continuations removed, spaces collapsed."""
    lines = [line[1:] for line in (ROOT / "examples" / name).read_text().splitlines() if line.startswith("#")]
    return " ".join(" ".join(lines).replace("\\", " ").split())


def one(pattern: str, text: str) -> re.Match:
    m = re.search(pattern, text)
    assert m, f"header lacks {pattern!r}:\n{text}"
    return m


def gb(x: float) -> str:
    return f"{x / GB:.1f}"


def merge_flags(base: list[str], extra: list[str]) -> list[str]:
    """base's options with extra's replacing the same option (--sp and --no-sp are one option)."""
    def options(tokens):
        out, key = {}, None
        for tok in tokens:
            if tok.startswith("--"):
                key = "--sp" if tok in ("--sp", "--no-sp") else tok
                out[key] = [tok]
            else:
                out[key].append(tok)
        return out
    merged = {**options(base), **options(extra)}
    return [tok for toks in merged.values() for tok in toks]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    load_config(path)  # raises ConfigError listing every problem


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_recipe_states_resources(name):
    text = header(name)
    assert "GPUs:" in text and "GB per GPU" in text and "estimate" in text and "not measured" in text
    cfg = load_config(ROOT / "examples" / name)
    long_context = name in LONG_CONTEXT and cfg.data.seq_length >= 32768 and cfg.parallel.cp > 1
    assert (long_context or cfg.data.seq_length == 4096) and cfg.data.batching == "packed"


@pytest.mark.parametrize("name", PEFT)
def test_peft_memory_figures_are_the_estimators(name):
    text, cfg = header(name), load_config(ROOT / "examples" / name)
    flags = one(r"peft_memory\.py (.*?)\):", text).group(1).split()
    args = build_parser().parse_args(flags)
    # the command describes this recipe
    (tp, pp, dp) = args.layout[0]
    assert args.models == [cfg.model.preset] and args.methods == [cfg.peft.method]
    assert (tp, pp) == (cfg.parallel.tp, cfg.parallel.pp) and (tp > 1 and args.sp) == cfg.parallel.sp
    assert args.ep == cfg.parallel.ep  # MoE: expert-parallel ranks
    assert args.cp == cfg.parallel.cp and not args.cp_gathered_kv  # recipes run TE's CP attention
    assert (args.seq, args.micro_batch, args.rank, args.recompute) == (
        cfg.data.seq_length, cfg.train.micro_batch_size, cfg.peft.rank, cfg.model.recompute)
    assert args.targets == list(cfg.peft.target_modules)
    [(_, _, _, _, est)] = estimates(args)
    m = one(r"base ([\d.]+) \+ adapters \(bf16\) ([\d.]+) \+ their grads \(fp32\) ([\d.]+) \+ Adam \([^)]*\) "
            r"([\d.]+) \+ activations \([^)]*\) ([\d.]+) \+ logits ([\d.]+)(?: \+ dequantised workspace ([\d.]+))? "
            r"= ([\d.]+) GB, plus [^:]*: ~(\d+) GB per GPU", text)
    want = [est.base_weights, est.adapters, est.grads, est.optimizer, est.activations, est.logits]
    assert list(m.groups()[:6]) == [gb(x) for x in want]
    assert m.group(7) == (gb(est.workspace) if cfg.peft.method == "qlora" else None)
    assert m.group(8) == gb(est.total) and int(m.group(9)) == round(est.total / GB + OVERHEAD_GB)
    # other layouts the header quotes: "(--layout ...): X + ~4 = ~Y GB per GPU"
    variants = re.findall(r"\((--layout [^)]*)\): ([\d.]+) \+ ~4 = ~(\d+) GB per GPU", text)
    assert variants, text
    for extra, total, rounded in variants:
        [(_, _, _, _, var)] = estimates(build_parser().parse_args(merge_flags(flags, extra.split())))
        assert (total, int(rounded)) == (gb(var.total), round(var.total / GB + OVERHEAD_GB)), extra


@pytest.mark.parametrize("name", FULL)
def test_full_finetune_memory_figures_follow_the_stated_formulas(name):
    """Full fine-tuning is not in the PEFT estimator; the header spells out its arithmetic
    (bytes per parameter, 34sbh/TP activation bytes per layer with SP, 1F1B in flight), so
    the figures are recomputed here from the preset and the recipe."""
    text, cfg = header(name), load_config(ROOT / "examples" / name)
    arch = PRESETS[cfg.model.preset]
    gpus = int(one(r"GPUs: (\d+)", text).group(1))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = gpus // (tp * pp)
    p_gpu = arch.num_params() / (tp * pp)
    s, b, h, L = cfg.data.seq_length, cfg.train.micro_batch_size, arch.hidden_size, arch.num_layers
    weights, grads, optim = 2 * p_gpu, 4 * p_gpu, 12 * p_gpu / dp
    # stage 0 of 1F1B holds pp micro batches of L/pp layers: L layers' worth
    activations = 34 * s * b * h / tp * (L // pp) * pp
    assert f"{arch.num_params() / 1e9:.2f}e9 params / (TP x PP) = {p_gpu / 1e9:.2f}e9" in text
    if name == "codellama34b_full.yaml":
        assert re.findall(r"\.{3,} ([\d.]+) GB", text) == [gb(weights), gb(grads), gb(optim), gb(activations)]
        dp1 = 2 * p_gpu + 4 * p_gpu + 12 * p_gpu + activations
        assert int(one(r"\(DP=1\): ~(\d+) GB per GPU", text).group(1)) == round(dp1 / GB + OVERHEAD_GB)
    else:
        m = one(r"= ([\d.]+) GB, activations \d+ x 34sbh/TP = ([\d.]+) GB", text)
        assert m.groups() == (gb(weights + grads + optim), gb(activations))
    total = weights + grads + optim + activations
    assert int(one(r"total ~(\d+) GB per GPU", text).group(1)) == round(total / GB + OVERHEAD_GB)


@pytest.mark.parametrize("name", CLUSTER)
def test_flops_and_step_times_are_the_formulas(name):
    text = header(name)
    m = one(r"step_flops\.py --config (\S+) --gpus (\d+) --mfu ([\d.]+)\): model (\S+), hardware (\S+) "
            r"\(recompute (\w+)", text)
    assert m.group(1) == f"examples/{name}"
    model, hardware, recompute = step_flops(str(ROOT / m.group(1)))
    assert (m.group(4), m.group(5), m.group(6)) == (f"{model:.3g}", f"{hardware:.3g}", recompute)
    mfu = float(m.group(3))
    assert f"at an assumed {100 * mfu:g}% MFU (not measured)" in text
    times = re.findall(r"on (\d+) (H100|H200|A100): ([\d.]+) s per step", text)
    assert times and times[0][0] == m.group(2)
    for gpus, card, seconds in times:
        assert seconds == f"{model / (int(gpus) * mfu * PEAK_BF16_FLOPS[card]):.3g}", (gpus, card)


def test_paper_study_recipe():
    cfg = load_config(ROOT / "examples" / "codellama34b_qlora.yaml")
    assert cfg.model.preset == "codellama-34b"
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (8, 128)
    assert (cfg.train.lr, cfg.train.min_lr) == (2e-4, 1e-5)
    assert cfg.loss.mode == "task-token" and cfg.peft.method == "qlora"
    assert load_config(ROOT / "examples" / "codellama34b_pretrain.yaml").loss.mode == "token"
