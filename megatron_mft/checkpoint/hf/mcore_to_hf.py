"""Megatron dist checkpoint -> Hugging Face folder (``convert mcore-to-hf``), streaming.

Accepted checkpoints (each describes itself):

* a ``convert hf-to-mcore`` output (``conversion.json``);
* a training checkpoint ``<output_dir>/checkpoints/step_N`` (``run.json`` holds the run config;
  ``<output_dir>`` or ``<output_dir>/checkpoints`` resolve to the step named by ``latest``).
  LoRA/QLoRA runs save only the adapters; their base is the run's ``model.hf_init`` (a Hugging
  Face folder) or ``train.init_checkpoint`` (a dist checkpoint), read from the same place.

Outputs: a folder of the family's class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``, ``Starcoder2ForCausalLM``: config.json, sharded safetensors + index, the
run's tokenizer, see :func:`plan_tokenizer`), with the adapters folded in (``merge_lora``), or a
peft adapter folder (``adapter_only``): ``adapter_config.json`` + ``adapter_model.safetensors`` in transformers'
module names, the fused ``linear_qkv`` adapter becoming q/k/v adapters that share ``A`` and
split ``B`` by rows (``linear_fc1`` -> gate/up likewise); routed experts' adapters become
peft ``target_parameters`` on transformers' fused expert tensors (``moe_adapters``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_mft.checkpoint.hf.families import FAMILIES, ConversionError, Family, family_for
from megatron_mft.checkpoint.hf.hf_io import SafetensorsShardWriter, parse_size
from megatron_mft.checkpoint.hf.hf_to_mcore import CONVERSION_FILE, DTYPES, TOKENIZER_DIR, staged_output
from megatron_mft.checkpoint.hf.hfconfig import TOKENIZER_FILES, read_hf_config
from megatron_mft.checkpoint.hf.mcore_io import DistCheckpoint, Template, build_template, shards_of
from megatron_mft.checkpoint.hf.source import HFSource
from megatron_mft.config import ModelConfig, PeftConfig
from megatron_mft.config.base import load_dataclass

ADAPTER_PREFIX = "base_model.model."


@dataclass
class CheckpointInfo:
    path: Path
    kind: str  # "conversion" | "training"
    model_cfg: ModelConfig
    family: Family
    #: the run's peft section when the checkpoint holds adapters only
    peft_cfg: Optional[PeftConfig] = None
    #: where the frozen base of an adapter checkpoint lives: ("hf", dir) or ("mcore", dir)
    base: Optional[tuple[str, Path]] = None
    hf_config: Optional[dict] = None
    tokenizer_dirs: list = field(default_factory=list)
    #: training checkpoints: the tokenizer the run trained with (data.tokenizer / its data manifest)
    run_tokenizer: Optional["RunTokenizer"] = None

    @property
    def adapters(self) -> bool:
        return self.peft_cfg is not None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a step directory, a checkpoints root or an output_dir (``latest``)."""
    from megatron_mft.checkpoint.dist import LATEST, latest_checkpoint

    p = Path(path)
    for root in (p / "checkpoints", p):
        if (root / LATEST).is_file():
            found = latest_checkpoint(root)
            if found is None:
                raise ConversionError(f"{root}/latest:", ["names no complete checkpoint (no run.json)"])
            return found
    return p


#: Files that make a tokenizer loadable by themselves (the other TOKENIZER_FILES configure one).
TOKENIZER_MODELS = ("tokenizer.model", "tokenizer.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity_file(path: Path) -> Optional[Path]:
    """The file a data manifest hashes for the tokenizer at ``path``: the file itself (a
    SentencePiece ``.model``, a ``tokenizer.json``), a folder's tokenizer.json (else tokenizer.model)."""
    if path.is_file():
        return path
    return next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), None)


@dataclass
class RunTokenizer:
    """The tokenizer a training run used, as its run.json names it (``data.tokenizer``, else the
    tokenizer recorded in its data manifest, with the sha256 of the file the data was made with)."""

    named: str
    #: where run.json names it, for messages
    key: str
    #: where it may be now: the path itself (absolute, or relative to this process's working
    #: folder), and relative to the run's working folder (derived from a relative output_dir)
    candidates: list
    sha256: Optional[str] = None

    @classmethod
    def of_run(cls, step_dir: Path, run: dict) -> Optional["RunTokenizer"]:
        cfg = run.get("config") or {}
        manifest_tok = (run.get("manifest") or {}).get("tokenizer") or {}
        named = (cfg.get("data") or {}).get("tokenizer") or manifest_tok.get("path")
        if not named or not isinstance(named, str):
            return None
        key = "data.tokenizer" if (cfg.get("data") or {}).get("tokenizer") else "the data manifest's tokenizer.path"
        path = Path(os.path.expanduser(named))
        candidates = [path.absolute()]
        out_dir = cfg.get("output_dir")
        if not path.is_absolute() and isinstance(out_dir, str) and out_dir and not os.path.isabs(out_dir):
            parts = Path(os.path.normpath(out_dir)).parts
            root = step_dir.absolute().parent.parent.parts  # <output_dir>/checkpoints/step_N -> output_dir
            if ".." not in parts and len(root) > len(parts) and root[-len(parts):] == parts:
                candidates.append(Path(*root[: -len(parts)]) / path)
        sha = manifest_tok.get("sha256") if isinstance(manifest_tok.get("sha256"), str) else None
        return cls(named=named, key=key, candidates=candidates, sha256=sha)

    def matches(self, path: Path) -> bool:
        """Whether ``path`` (a file or a folder) holds the tokenizer the run's data was made with
        (always, when the run recorded no sha256)."""
        ident = _identity_file(path)
        return ident is not None and (self.sha256 is None or _sha256(ident) == self.sha256)

    def locate(self) -> tuple[Optional[Path], Optional[str]]:
        """(where the run's tokenizer is now, None) or (None, why it is not usable)."""
        found = [c for c in self.candidates if c.exists()]
        for c in found:
            if self.matches(c):
                return c, None
        if found:
            return None, (f"the run's tokenizer ({self.key} {self.named}) at {found[0]} is not the one the run "
                          f"trained with (sha256 differs from its data manifest's)")
        return None, (f"the run's tokenizer ({self.key} {self.named}) was not found (looked for "
                      + ", ".join(str(c) for c in self.candidates) + ")")


def describe_checkpoint(path: str | Path) -> CheckpointInfo:
    p = resolve_checkpoint(path)
    if (p / CONVERSION_FILE).is_file():
        meta = json.loads((p / CONVERSION_FILE).read_text())
        model = load_dataclass(ModelConfig, meta["model"], source=str(p / CONVERSION_FILE))
        hf_cfg = meta.get("hf_config")
        return CheckpointInfo(path=p, kind="conversion", model_cfg=model,
                              family=FAMILIES[meta.get("family", "llama")], hf_config=hf_cfg,
                              tokenizer_dirs=[p / TOKENIZER_DIR, Path(meta.get("source", {}).get("hf_dir", p))])
    if not (p / "run.json").is_file():
        raise ConversionError(f"cannot tell what {p} holds:", [
            f"no {CONVERSION_FILE} (convert hf-to-mcore output) and no run.json (training checkpoint)"])
    run = json.loads((p / "run.json").read_text())
    cfg = run.get("config", {})
    model = load_dataclass(ModelConfig, cfg.get("model", {}), source=str(p / "run.json"))
    peft = load_dataclass(PeftConfig, cfg.get("peft", {}), source=str(p / "run.json"))
    adapters = (run.get("peft") or peft.method) not in (None, "none")
    hf_init = model.hf_init
    init_ckpt = (cfg.get("train") or {}).get("init_checkpoint")
    base, hf_cfg, toks = None, None, [p / TOKENIZER_DIR]
    if hf_init:
        base = ("hf", Path(hf_init))
        if (Path(hf_init) / "config.json").is_file():
            hf_cfg = read_hf_config(hf_init)
        toks.append(Path(hf_init))
    elif init_ckpt:
        base = ("mcore", resolve_checkpoint(init_ckpt))
        conv = base[1] / CONVERSION_FILE
        if conv.is_file():
            hf_cfg = json.loads(conv.read_text()).get("hf_config")
        toks.append(base[1] / TOKENIZER_DIR)
    run_tok = RunTokenizer.of_run(p, run)
    if adapters and base is None:
        raise ConversionError(f"{p} holds adapters only, but its run names no base:",
                              ["run.json config has neither model.hf_init nor train.init_checkpoint"])
    return CheckpointInfo(path=p, kind="training", model_cfg=model, family=family_for(hf_cfg) if hf_cfg else
                          FAMILIES[model.arch().family], peft_cfg=peft if adapters else None,
                          base=base if adapters else None,
                          hf_config=hf_cfg, tokenizer_dirs=toks, run_tokenizer=run_tok)


# ------------------------------------------------------------------------------------ readers
class Reader:
    """Canonical megatron names -> TP=1 tensors, for the checkpoint and (adapter runs) its base.
    The base is opened on first use: an adapter-only export does not need it to exist."""

    def __init__(self, info: CheckpointInfo, template: Template):
        self.info, self.template = info, template
        self.ckpt = DistCheckpoint(info.path)
        self._base = None

    def _open_base(self):
        if self._base is None:
            info, template = self.info, self.template
            embed_key = shards_of(template.tensors["embedding.word_embeddings.weight"])[0].key
            if info.base is None:
                self._base = (lambda name: self.ckpt.load(template, name), self.ckpt.dtype(embed_key))
            elif info.base[0] == "hf":
                src = HFSource(info.base[1], info.family, info.model_cfg.arch(), read_hf_config(info.base[1]))
                self._base = (src.get, src.dtype())
            else:
                base = DistCheckpoint(info.base[1])
                self._base = (lambda name: base.load(template, name), base.dtype(embed_key))
        return self._base

    def base_get(self, name: str) -> torch.Tensor:
        return self._open_base()[0](name)

    @property
    def base_dtype(self) -> torch.dtype:
        return self._open_base()[1]

    def targets(self) -> list[str]:
        """Adapter paths (``decoder.layers.3.self_attention.linear_qkv``) in checkpoint order."""
        return [n[: -len(".lora_A.weight")] for n in self.template.names(adapters=True)
                if n.endswith(".lora_A.weight")]

    def adapter(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of one adapter, TP=1 layout (B's rows in the weight's layout:
        peft saves the fused fc1's B through megatron's swiglu factory, as [gate; up])."""
        return (self.ckpt.load(self.template, f"{path}.lora_A.weight"),
                self.ckpt.load(self.template, f"{path}.lora_B.weight"))


def _merged(reader: Reader, path: str, base: torch.Tensor, quantized: bool) -> torch.Tensor:
    """Base + scaling * B @ A with the arithmetic of the training-time merge: fp32 sum, rounded
    to the adapters' (training) dtype; a QLoRA base goes through NF4 first, as in training."""
    from megatron_mft.peft import NF4Weight
    from megatron_mft.peft.layers import lora_delta, merged_weight

    a, b = reader.adapter(path)
    train_dtype = a.dtype
    base = base.to(train_dtype)
    if quantized:
        base = NF4Weight.quantize(base).dequantize(torch.float32)
    return merged_weight(base, lora_delta(a, b, reader.template.lora_scaling[path]), train_dtype)


def _check_empty_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError("refusing to write into a non-empty folder:", [str(out)])


def _check_finite(name: str, t: torch.Tensor) -> None:
    """Export refuses NaN/inf weights (a diverged run) rather than writing a model that cannot work."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise ConversionError("refusing to export non-finite weights:", [
            f"{name}: {n_nan} NaN and {n_inf} inf of {t.numel()} values (the run diverged; export an earlier "
            f"checkpoint)"])


@dataclass
class TokenizerPlan:
    """What the export writes as its tokenizer, decided before the weights are converted."""

    #: output file name -> source file
    copies: dict = field(default_factory=dict)
    #: tokenizer_config.json written for a lone tokenizer file (None: copied or absent)
    config: Optional[dict] = None
    #: where the files come from, for the log
    source: str = ""
    #: notes for the log (a run tokenizer not found, a folder without a tokenizer model...)
    notes: list = field(default_factory=list)

    @property
    def loadable(self) -> bool:
        return any(n in self.copies for n in TOKENIZER_MODELS)


def _lone_sentencepiece(path: Path, what: str) -> TokenizerPlan:
    """A SentencePiece ``.model`` file -> ``tokenizer.model`` + a tokenizer_config.json with which
    ``AutoTokenizer`` builds the tokenizer from the model's own proto (normalizer, dummy prefix,
    byte fallback, user-defined pieces): the same ids as SentencePiece itself."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError on bad files
        raise ConversionError(f"{what} {path} is not a SentencePiece model:", [str(e).strip() or type(e).__name__]) \
            from None

    def piece(i: int) -> Optional[str]:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    config = {"tokenizer_class": "TokenizersBackend",  # transformers 5: built from tokenizer.model's proto
              "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
              "pad_token": piece(sp.pad_id()), "add_bos_token": sp.bos_id() >= 0, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    return TokenizerPlan(copies={"tokenizer.model": path}, config={k: v for k, v in config.items() if v is not None},
                         source=f"{what} {path} (SentencePiece, written as tokenizer.model)")


def _lone_tokenizer_json(path: Path, what: str) -> TokenizerPlan:
    """A ``tokenizer.json`` file (any name) -> ``tokenizer.json`` + a tokenizer_config.json naming
    its special tokens (EOS: the conventional names among its added tokens)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise ConversionError(f"{what} {path} is not a tokenizer.json file:", [str(e).strip() or type(e).__name__]) \
            from None
    added = {t.content for t in tok.get_added_tokens_decoder().values()}

    def first(*names: str) -> Optional[str]:
        return next((n for n in names if n in added), None)

    eos = first("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|im_end|>")
    if eos is None:
        raise ConversionError(f"{what} {path} names no end-of-sequence token:", [
            "none of </s>, <|endoftext|>, <eos>, <|end_of_text|>, <|im_end|> is an added token; pass the folder "
            "with its tokenizer_config.json instead (--tokenizer DIR)"])
    config = {"tokenizer_class": "TokenizersBackend", "bos_token": first("<s>", "<bos>", "<|begin_of_text|>"),
              "eos_token": eos, "unk_token": first("<unk>"), "pad_token": first("<pad>", "<|pad|>"),
              "clean_up_tokenization_spaces": False}
    return TokenizerPlan(copies={"tokenizer.json": path}, config={k: v for k, v in config.items() if v is not None},
                         source=f"{what} {path} (written as tokenizer.json)")


def _from_file(path: Path, what: str) -> TokenizerPlan:
    if path.suffix == ".model":
        return _lone_sentencepiece(path, what)
    if path.suffix == ".json":
        return _lone_tokenizer_json(path, what)
    raise ConversionError(f"{what} {path}: not a tokenizer file:", [
        "expected a SentencePiece .model file, a tokenizer.json file or a folder of tokenizer files"])


def _from_folder(folder: Path, what: str = "") -> TokenizerPlan:
    copies = {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}
    return TokenizerPlan(copies=copies, source=f"{what} {folder}".strip())


def plan_tokenizer(info: CheckpointInfo, override: Optional[str | Path] = None) -> TokenizerPlan:
    """The tokenizer the export writes, before any weight is converted (problems fail early).

    ``override`` (``--tokenizer``): a folder of tokenizer files, a SentencePiece ``.model`` file or
    a ``tokenizer.json`` file. Else, for a training checkpoint, the run's own tokenizer (its
    ``data.tokenizer``, else its data manifest's tokenizer, checked against the manifest's sha256):
    a folder is copied; a lone file is copied under its Hugging Face name with a
    tokenizer_config.json, unless one of the checkpoint's tokenizer folders (its base's Hugging
    Face folder...) or the file's own folder holds the same file, with its configuration: then that
    folder is copied. Last, the first of the checkpoint's tokenizer folders that holds a tokenizer."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.exists():
            raise ConversionError("--tokenizer:", [f"{override} does not exist"])
        plan = _from_file(path, "--tokenizer") if path.is_file() else _from_folder(path, "--tokenizer")
        if not plan.copies:
            raise ConversionError("--tokenizer:", [f"{override} holds no tokenizer files (looked for "
                                                   f"{', '.join(TOKENIZER_FILES)})"])
        if not plan.loadable:
            plan.notes.append(f"--tokenizer {override} has no {' or '.join(TOKENIZER_MODELS)}: the export's "
                              f"tokenizer will not load")
        run_tok = info.run_tokenizer
        if run_tok is not None and run_tok.sha256 and not run_tok.matches(path):
            plan.notes.append(f"--tokenizer {override} is not the tokenizer the run trained with ({run_tok.key} "
                              f"{run_tok.named}; sha256 differs): the exported model may not work with it")
        return plan

    notes: list[str] = []
    folders = [d for d in info.tokenizer_dirs if d.is_dir()]
    run_tok = info.run_tokenizer
    if run_tok is not None:
        found, why = run_tok.locate()
        if found is not None and found.is_dir():
            plan = _from_folder(found, f"the run's tokenizer ({run_tok.key})")
            if plan.loadable:
                return plan
            notes.append(f"the run's tokenizer folder {found} holds no {' or '.join(TOKENIZER_MODELS)}")
        elif found is not None:
            canonical = "tokenizer.model" if found.suffix == ".model" else "tokenizer.json"
            digest = _sha256(found)
            for d in folders + [found.parent]:  # the same file with its Hugging Face configuration
                twin = d / canonical
                if twin.is_file() and (twin.resolve() == found.resolve() or _sha256(twin) == digest):
                    return _from_folder(d, f"the run's tokenizer ({run_tok.key} {run_tok.named}), with its folder")
            plan = _from_file(found, f"the run's tokenizer ({run_tok.key})")
            plan.notes = notes
            return plan
        else:
            notes.append(why)
    partial = None
    for d in folders:
        if run_tok is not None and run_tok.sha256 and _identity_file(d) is not None and not run_tok.matches(d):
            notes.append(f"{d} holds another tokenizer than the run trained with (sha256 differs): not used")
            continue
        plan = _from_folder(d)
        if plan.loadable:
            plan.notes = notes
            return plan
        partial = partial or (plan if plan.copies else None)
    looked = ", ".join([str(d) for d in info.tokenizer_dirs] + ([run_tok.named] if run_tok else []))
    if partial is not None:
        partial.notes = notes + [f"no {' or '.join(TOKENIZER_MODELS)} found (looked in {looked}): the export's "
                                 f"tokenizer will not load; pass --tokenizer FILE|DIR"]
        return partial
    return TokenizerPlan(source="", notes=notes + [f"no tokenizer found (looked in {looked})"])


def _write_tokenizer(plan: TokenizerPlan, out: Path, shown: Path, log, adapter: bool = False) -> list[str]:
    for name, src in plan.copies.items():
        shutil.copyfile(src, out / name)
    written = list(plan.copies)
    if plan.config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        written.append("tokenizer_config.json")
    if written:
        log(f"tokenizer: {', '.join(written)} from {plan.source}")
    if not plan.loadable and not adapter:  # an adapter is used with its base model's tokenizer
        log(f"warning: the export {shown} has no tokenizer: `python -m megatron_mft.evaluate` and generation "
            f"need one. Rerun with --tokenizer FILE|DIR (the run's SentencePiece .model, a tokenizer.json or a "
            f"tokenizer folder), or copy the tokenizer files into {shown}")
    return written


def check_out_apart(out: str | Path, inputs: list, why: str) -> None:
    """Refuse an output folder inside (or holding) one of ``inputs`` [(path, what it is)]: an
    export written into a checkpoint step folder is deleted with it when training saves that step
    again; one written into the folder it is read from mixes with it. ``why`` ends the message."""
    o = Path(out).expanduser().resolve()
    for path, what in inputs:
        p = Path(path).expanduser().resolve()
        if o == p or p in o.parents:
            raise ConversionError(f"--out {out} is inside {path}, {what}:", [f"{why}; choose an --out outside {path}"])
        if o in p.parents:
            raise ConversionError(f"--out {out} contains {path}, {what}:", [
                "the output must be a new folder apart from its input; choose another --out"])


def export_to_hf(ckpt: str | Path, out_dir: str | Path, *, merge_lora: bool = False, adapter_only: bool = False,
                 dtype: Optional[str] = None, max_shard_size: str = "5GB", tokenizer: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict:
    """Needs torch.distributed + megatron parallel state at TP=1/PP=1 in this process."""
    info = describe_checkpoint(ckpt)
    out = Path(out_dir)
    if adapter_only and merge_lora:
        raise ConversionError("conflicting options:", ["--adapter-only and --merge-lora exclude each other"])
    if adapter_only and not info.adapters:
        raise ConversionError(f"{info.path} has no adapters:", [
            "--adapter-only exports LoRA adapters; this is a full checkpoint (export it without the flag)"])
    if info.adapters and not (adapter_only or merge_lora):
        raise ConversionError(f"{info.path} holds LoRA adapters only (base: {info.base[1]}):", [
            "pass --merge-lora for a full model with the adapters folded in, or --adapter-only for a peft adapter folder"])
    if merge_lora and not info.adapters:
        log(f"note: {info.path} is a full checkpoint; --merge-lora has nothing to fold in")
    # the checkpoint tree being read: the step folder, and the run's checkpoints/ folder (step
    # folders come and go there); a run's output_dir outside checkpoints/ is fine (OUTPUT_DIR/hf)
    given = "" if Path(ckpt) == info.path else f" (--ckpt {ckpt})"
    inputs = [(info.path, f"the checkpoint being read{given}")]
    if info.kind == "training" and (info.path.parent.name == "checkpoints" or (info.path.parent / "latest").is_file()):
        inputs.append((info.path.parent, f"the checkpoints folder of the run being read{given}"))
    check_out_apart(out, inputs, "training deletes or replaces a step folder, with what is inside it, when it "
                                 "saves that step again")
    _check_empty_out(out)
    tok = plan_tokenizer(info, tokenizer)
    for note in tok.notes:
        log(f"note: {note}")
    template = build_template(info.model_cfg, info.peft_cfg)
    reader = Reader(info, template)
    with staged_output(out) as tmp:
        if adapter_only:
            return _export_adapters(info, reader, tmp, tok, log, shown=out)
        return _export_model(info, reader, tmp, dtype, max_shard_size, tok, log, shown=out)


def _export_model(info: CheckpointInfo, reader: Reader, out: Path, dtype: Optional[str], max_shard_size: str,
                  tokenizer: TokenizerPlan, log, shown: Path) -> dict:
    from transformers import AutoConfig

    t0 = time.time()
    family, arch = info.family, info.model_cfg.arch()
    target = DTYPES[dtype] if dtype else reader.base_dtype
    lora = set(reader.targets()) if info.adapters else set()
    quantized = info.adapters and info.peft_cfg.method == "qlora"
    entries = family.entries(arch)
    items = [(name, shape, target) for w, layer in entries
             for name, shape in zip(w.hf_names(layer), w.hf_shapes(arch))]
    writer = SafetensorsShardWriter(out, items, parse_size(max_shard_size))
    for i, (w, layer) in enumerate(entries):
        name = w.megatron_name(layer)
        t = reader.base_get(name)
        path = name[: -len(".weight")]
        if path in lora:
            t = _merged(reader, path, t, quantized)
        _check_finite(name, t)
        for hf_name, part in zip(w.hf_names(layer), w.transform.split(t, arch)):
            writer.write(hf_name, part.to(target))
        del t
        if (i + 1) % max(1, len(entries) // 10) == 0:
            log(f"  {i + 1}/{len(entries)} tensors ({time.time() - t0:.0f}s) {name}")
    files = writer.close()
    dtype_name = str(target).replace("torch.", "")
    cfg = family.hf_config(arch, dtype_name, base=info.hf_config)
    AutoConfig.for_model(cfg.pop("model_type"), **cfg).save_pretrained(out)
    tok = _write_tokenizer(tokenizer, out, shown, log)
    merged = f", {len(lora)} adapters merged" if lora else ""
    log(f"wrote {shown}: {family.architecture}, {len(items)} tensors in {len(files)} file(s), {dtype_name}{merged} "
        f"({time.time() - t0:.0f}s)")
    return {"files": files, "tensors": len(items), "merged": len(lora), "tokenizer_files": tok}


def _export_adapters(info: CheckpointInfo, reader: Reader, out: Path, tokenizer: TokenizerPlan, log,
                     shown: Path) -> dict:
    from safetensors.torch import save_file

    from megatron_mft.checkpoint.hf.moe_adapters import FusedExpertAdapters, is_expert_adapter
    from megatron_mft.peft import lora_scaling

    family, arch, peft = info.family, info.model_cfg.arch(), info.peft_cfg
    expected = lora_scaling(peft.rank, peft.alpha, peft.rslora)
    tensors, modules = {}, set()
    experts = FusedExpertAdapters(arch.num_experts)  # routed experts: peft target_parameters
    for path in reader.targets():
        if abs(reader.template.lora_scaling[path] - expected) > 1e-12 * max(1.0, abs(expected)):
            raise ConversionError("adapter scaling differs from peft's:", [
                f"{path}: megatron scaling {reader.template.lora_scaling[path]}, peft would use {expected}"])
        a, b = reader.adapter(path)
        _check_finite(f"{path}.lora_A.weight", a)
        _check_finite(f"{path}.lora_B.weight", b)
        if is_expert_adapter(path):
            experts.add(path, a, b)
            continue
        w, layer = family.entry_for(f"{path}.weight")
        for hf_name, b_part in zip(w.hf_names(layer), w.transform.split(b, arch)):
            mod = hf_name[: -len(".weight")]
            modules.add(mod.rsplit(".", 1)[1])
            tensors[f"{ADAPTER_PREFIX}{mod}.lora_A.weight"] = a.clone()  # shared A: one copy per module
            tensors[f"{ADAPTER_PREFIX}{mod}.lora_B.weight"] = b_part.clone()
    if experts:
        tensors.update(experts.tensors(ADAPTER_PREFIX))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    base_name = (str(info.base[1]) if info.base and info.base[0] == "hf" else
                 (info.hf_config or {}).get("_name_or_path") or arch.hf_name or "")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": peft.rank, "lora_alpha": peft.alpha, "lora_dropout": peft.dropout, "use_rslora": peft.rslora,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    }
    if experts:  # peft's ParamWrapper on the fused expert parameters takes no dropout (inference: none)
        config["target_parameters"] = experts.target_parameters()
        config["lora_dropout"] = 0.0
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = _write_tokenizer(tokenizer, out, shown, log, adapter=True)
    log(f"wrote {shown}: peft LoRA adapter (r={peft.rank}, alpha={peft.alpha:g}, "
        f"{'QLoRA: apply to the full-precision base' if peft.method == 'qlora' else 'LoRA'}), "
        f"{len(tensors)} tensors on {', '.join(sorted(modules) + config.get('target_parameters', []))}")
    return {"tensors": len(tensors), "target_modules": sorted(modules),
            "target_parameters": config.get("target_parameters", []), "tokenizer_files": tok}
