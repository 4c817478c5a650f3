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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_mft.checkpoint.hf.families import FAMILIES, ConversionError, Family, family_for, family_problems
from megatron_mft.checkpoint.hf.hf_io import SafetensorsShardWriter, parse_size
from megatron_mft.checkpoint.hf.hf_to_mcore import CONVERSION_FILE, DTYPES, TOKENIZER_DIR, staged_output
from megatron_mft.checkpoint.described import INIT_FILE, first_existing, read_description, run_relative_paths
from megatron_mft.checkpoint.hf.export_tokenizer import RunTokenizer, TokenizerPlan, plan_tokenizer, write_tokenizer
from megatron_mft.checkpoint.hf.hfconfig import read_hf_config
from megatron_mft.checkpoint.hf.mcore_io import DistCheckpoint, Template, build_template, shards_of
from megatron_mft.checkpoint.hf.source import HFSource
from megatron_mft.config import ModelConfig, PeftConfig

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


def describe_checkpoint(path: str | Path) -> CheckpointInfo:
    given = Path(path)
    if not given.is_dir():
        raise ConversionError(f"--ckpt {given} " + ("is a file, not a checkpoint folder:" if given.exists() else
                                                     "does not exist:"),
                              ["give a conversion output, a training step folder, or a run's output_dir or "
                               "checkpoints folder (its latest step)"])
    p = resolve_checkpoint(path)
    described = read_description(p)
    if described is None or described.file.name == INIT_FILE:
        raise ConversionError(f"cannot tell what {p} holds:", [
            f"no {CONVERSION_FILE} (convert hf-to-mcore output) and no run.json (training checkpoint)"])
    meta, model = described.meta, described.model
    if described.file.name == CONVERSION_FILE:
        hf_cfg = meta.get("hf_config")
        return CheckpointInfo(path=p, kind="conversion", model_cfg=model,
                              family=FAMILIES[meta["family"]] if "family" in meta else family_for(hf_cfg) if hf_cfg
                              else FAMILIES["llama"], hf_config=hf_cfg,  # an older conversion: by its config
                              tokenizer_dirs=[p / TOKENIZER_DIR, Path(meta.get("source", {}).get("hf_dir", p))])
    run, peft, adapters = meta, described.peft, described.adapters
    cfg = run.get("config", {})
    hf_init = model.hf_init
    init_ckpt = (cfg.get("train") or {}).get("init_checkpoint")
    base, hf_cfg, toks = None, None, [p / TOKENIZER_DIR]
    if hf_init:  # relative: from here, else from the run's working folder
        hf_dir = first_existing(run_relative_paths(hf_init, p, cfg))
        base = ("hf", hf_dir)
        if (hf_dir / "config.json").is_file():
            hf_cfg = read_hf_config(hf_dir)
        toks.append(hf_dir)
    elif init_ckpt:
        base = ("mcore", resolve_checkpoint(first_existing(run_relative_paths(init_ckpt, p, cfg))))
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


def _check_family(info: CheckpointInfo, family: Optional[str]) -> None:
    """The family the export writes must represent the checkpoint's architecture: a run that
    overrode a preset (``model.num_experts`` on a Llama preset) trains, but is not a model of the
    preset's family. Refused by name before any tensor is read; ``--family`` picks another."""
    if family is not None:
        fam = FAMILIES[family]
        model_type = (info.hf_config or {}).get("model_type")
        if model_type is not None and model_type not in fam.model_types:
            raise ConversionError(f"--family {family}: {info.path} comes from a Hugging Face {model_type} model:", [
                f"its base's config.json says model_type={model_type!r}; {family} is {', '.join(fam.model_types)}"])
        info.family = fam
    problems = family_problems(info.model_cfg.arch(), key="the model", fam=info.family)
    if problems:  # the message names the families that fit
        raise ConversionError(f"{info.path} is not a {info.family.name} model ({info.family.architecture}), "
                              f"so it cannot be written as one (--family NAME writes another family):", problems)


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


def check_out_apart(out: str | Path, inputs: list, why: str) -> None:
    """Refuse an output folder inside (or holding) one of ``inputs`` [(path, what it is)]: an
    export written into a checkpoint step folder is deleted with it when training saves that step
    again; one written into the folder it is read from mixes with it. ``why`` ends the message."""
    from megatron_mft.compat.fsops import is_within

    for path, what in inputs:
        if is_within(out, path):
            raise ConversionError(f"--out {out} is inside {path}, {what}:", [f"{why}; choose an --out outside {path}"])
        if is_within(path, out):
            raise ConversionError(f"--out {out} contains {path}, {what}:", [
                "the output must be a new folder apart from its input; choose another --out"])


def export_to_hf(ckpt: str | Path, out_dir: str | Path, *, merge_lora: bool = False, adapter_only: bool = False,
                 dtype: Optional[str] = None, max_shard_size: str = "5GB", tokenizer: Optional[str] = None,
                 family: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Needs torch.distributed + megatron parallel state at TP=1/PP=1 in this process. ``family``:
    the Hugging Face family to write (default: the base model's, else the run's model.family)."""
    info = describe_checkpoint(ckpt)
    _check_family(info, family)
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
    tok = write_tokenizer(tokenizer, out, shown, log)
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
    tok = write_tokenizer(tokenizer, out, shown, log, adapter=True)
    log(f"wrote {shown}: peft LoRA adapter (r={peft.rank}, alpha={peft.alpha:g}, "
        f"{'QLoRA: apply to the full-precision base' if peft.method == 'qlora' else 'LoRA'}), "
        f"{len(tensors)} tensors on {', '.join(sorted(modules) + config.get('target_parameters', []))}")
    return {"tensors": len(tensors), "target_modules": sorted(modules),
            "target_parameters": config.get("target_parameters", []), "tokenizer_files": tok}
