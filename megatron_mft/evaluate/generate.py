"""Greedy generation from an exported Hugging Face model folder: vLLM when importable, else
transformers. Local files only: nothing is downloaded.

Both backends receive token ids that we produced (see :mod:`megatron_mft.evaluate.encoding`), so
the special-token handling is the one chosen on the command line whatever the backend's default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_mft.errors import UserError
from megatron_mft.evaluate.prompts import CHAT_STOPS, STOP_SEQUENCES, cut_chat_stops, generation_done

log = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "vllm")


@dataclass(frozen=True)
class GenerationConfig:
    #: New tokens per problem at most.
    max_new_tokens: int = 512
    #: auto = vLLM if importable, else transformers.
    backend: str = "auto"
    #: auto = cuda if available, else cpu (transformers backend).
    device: str = "auto"
    #: auto = bfloat16 on GPU, float32 on CPU; or float32 / bfloat16 / float16.
    dtype: str = "auto"
    #: Prompts per generate() call (transformers backend; left padding when > 1).
    batch_size: int = 1


def have_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is "not available"
        return False
    return True


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "vllm" if have_vllm() else "transformers"
    return name


def resolve_device_dtype(cfg: GenerationConfig) -> tuple[str, str]:
    """The transformers backend's device and dtype: auto = cuda (bfloat16) if available, else cpu
    (float32)."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def load_tokenizer(hf_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


class Generator:
    """``generate(prompts, template) -> list[str]`` for one loaded model."""

    def __init__(self, hf_dir: str, tokenizer, cfg: GenerationConfig):
        self.hf_dir, self.tok, self.cfg = hf_dir, tokenizer, cfg
        self.backend = resolve_backend(cfg.backend)
        self.device = None
        self.dtype = None
        if self.backend == "vllm":
            self._init_vllm()
        else:
            self._init_hf()

    # --- transformers -------------------------------------------------------------------------
    def _init_hf(self):
        import torch
        from transformers import AutoModelForCausalLM

        device, dtype = resolve_device_dtype(self.cfg)
        self.device, self.dtype = device, dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            self.hf_dir, local_files_only=True, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"

    def _generate_hf(self, ids: Sequence[list[int]], template: str) -> list[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tok

        class _Done(StoppingCriteria):
            def __init__(self, prompt_len):
                self.prompt_len = prompt_len

            def __call__(self, input_ids, scores, **kwargs):
                texts = tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=False)
                return torch.tensor([generation_done(t, template) for t in texts],
                                    dtype=torch.bool, device=input_ids.device)

        width = max(len(x) for x in ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attn, max_new_tokens=self.cfg.max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([_Done(width)]))
        return [self._decode(row[width:].tolist()) for row in out]

    def _decode(self, ids: list[int]) -> str:
        """Generated ids -> text: cut at the first EOS, keep role markers visible for cutting."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {self.tok.eos_token_id}
        for i, t in enumerate(ids):
            if t in eos:
                ids = ids[:i]
                break
        text = cut_chat_stops(self.tok.decode(ids, skip_special_tokens=False))
        for special in self.tok.all_special_tokens:
            text = text.replace(special, "")
        return text

    # --- vLLM ---------------------------------------------------------------------------------
    def _init_vllm(self):
        from vllm import LLM

        self.dtype, self.device = self.cfg.dtype, "cuda"
        try:
            self.llm = LLM(model=self.hf_dir, tokenizer=self.hf_dir, dtype=self.cfg.dtype, trust_remote_code=False)
        except ValueError as e:  # vLLM's own refusals (KV cache too small for the model's length, ...) say what to do
            raise UserError(f"--backend vllm: vLLM could not start {self.hf_dir}: {e}\n"
                            "(or --backend transformers, which needs no KV-cache reservation)") from e

    def _generate_vllm(self, ids: Sequence[list[int]], template: str) -> list[str]:
        from vllm import SamplingParams

        stop = list(CHAT_STOPS) + (list(STOP_SEQUENCES) if template == "plain" else [])
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens, stop=stop)
        reqs = [{"prompt_token_ids": list(x)} for x in ids]
        outs = self.llm.generate(reqs, params)
        return [o.outputs[0].text for o in outs]

    # --- common -------------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[list[int]], template: str,
                 progress: Optional[Callable[[int, int], None]] = None) -> list[str]:
        """Greedy completion text for each prompt (token ids); ``template`` picks the early stop."""
        if self.backend == "vllm":
            return self._generate_vllm(prompt_ids, template)
        out: list[str] = []
        bs = self.cfg.batch_size
        for i in range(0, len(prompt_ids), bs):
            out.extend(self._generate_hf(prompt_ids[i:i + bs], template))
            if progress is not None:
                progress(len(out), len(prompt_ids))
        return out

    def describe(self) -> dict:
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype,
                "greedy": True, "max_new_tokens": self.cfg.max_new_tokens,
                "batch_size": self.cfg.batch_size if self.backend == "transformers" else None}
