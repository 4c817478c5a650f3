"""Benchmarks for exported models: HumanEval pass@1 with sandboxed execution.

CLI: ``python -m megatron_mft.evaluate humaneval --hf-dir DIR`` (see docs/evaluation.md).
Heavy imports (torch, transformers, vLLM) happen only when a model is loaded.
"""

from megatron_mft.evaluate.generate import GenerationConfig
from megatron_mft.evaluate.humaneval import HumanEvalConfig, build_program, load_problems, run_humaneval
from megatron_mft.evaluate.prompts import PromptTemplate, postprocess
from megatron_mft.evaluate.sandbox import ExecResult, SandboxLimits, run_many, run_program

__all__ = [
    "ExecResult",
    "GenerationConfig",
    "HumanEvalConfig",
    "PromptTemplate",
    "SandboxLimits",
    "build_program",
    "load_problems",
    "postprocess",
    "run_humaneval",
    "run_many",
    "run_program",
]
