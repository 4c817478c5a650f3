"""The tokenizer an HF export writes (``convert mcore-to-hf``): the run's own, decided before any
weight is converted. A training checkpoint's run.json names it (``data.tokenizer``, else its data
manifest's tokenizer, whose sha256 tells a moved or replaced file); a lone SentencePiece ``.model``
or ``tokenizer.json`` is written under its Hugging Face name with a tokenizer_config.json that
``AutoTokenizer`` (transformers 5) loads to the same ids."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron_mft.checkpoint.described import run_relative_paths
from megatron_mft.checkpoint.hf.families import ConversionError
from megatron_mft.checkpoint.hf.hfconfig import TOKENIZER_FILES, TOKENIZER_MODEL_FILES
from megatron_mft.data.tokenizer import file_sha256 as _sha256
from megatron_mft.data.tokenizer import identity_file as _identity_file

if TYPE_CHECKING:
    from megatron_mft.checkpoint.hf.mcore_to_hf import CheckpointInfo

@dataclass
class RunTokenizer:
    """The tokenizer a training run used, as its run.json names it (``data.tokenizer``, else the
    tokenizer recorded in its data manifest, with the sha256 of the file the data was made with)."""

    named: str
    #: where run.json names it, for messages
    key: str
    #: where it may be now: the path itself (absolute, or relative to this process's working
    #: folder), relative to the run's working folder (derived from a relative output_dir), and
    #: the absolute path its data manifest recorded
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
        candidates = run_relative_paths(named, step_dir, cfg)
        recorded = manifest_tok.get("path")  # absolute: where the data was made from (an offline run's tokenizer)
        if isinstance(recorded, str) and Path(recorded).is_absolute() and Path(recorded) not in candidates:
            candidates.append(Path(recorded))
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
        return any(n in self.copies for n in TOKENIZER_MODEL_FILES)


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


def plan_tokenizer(info: "CheckpointInfo", override: Optional[str | Path] = None) -> TokenizerPlan:
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
            plan.notes.append(f"--tokenizer {override} has no {' or '.join(TOKENIZER_MODEL_FILES)}: the export's "
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
            notes.append(f"the run's tokenizer folder {found} holds no {' or '.join(TOKENIZER_MODEL_FILES)}")
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
        partial.notes = notes + [f"no {' or '.join(TOKENIZER_MODEL_FILES)} found (looked in {looked}): the export's "
                                 f"tokenizer will not load; pass --tokenizer FILE|DIR"]
        return partial
    return TokenizerPlan(source="", notes=notes + [f"no tokenizer found (looked in {looked})"])


def write_tokenizer(plan: TokenizerPlan, out: Path, shown: Path, log, adapter: bool = False) -> list[str]:
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
