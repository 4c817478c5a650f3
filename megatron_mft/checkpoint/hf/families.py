"""Model families: declarative weight maps and config maps, in a registry keyed by family.

A family says, as data, how a Hugging Face checkpoint of that architecture relates to our
megatron-core model:

* ``weights``: one :class:`W` per megatron tensor. Names use ``{}`` for the layer index. The
  megatron name is the tensor's *dist-checkpoint key* with the layer index put after
  ``decoder.layers.`` (the key megatron-core writes for both the local and the Transformer
  Engine layer spec; the local spec stores ``input_layernorm.weight`` under
  ``self_attention.linear_qkv.layer_norm_weight`` and ``pre_mlp_layernorm.weight`` under
  ``mlp.linear_fc1.layer_norm_weight``). HF shapes are written with the symbols of
  :data:`SHAPE_SYMBOLS`; every source tensor is checked against them before anything is written.
* ``config``: which ``config.json`` key fills which :class:`ArchSpec` field, and which HF
  features the engine does not implement (each is refused by name).

LoRA export needs nothing extra: an adapter on megatron linear ``X`` becomes adapters on the HF
modules whose ``.weight`` tensors ``X.weight`` is fused from; ``A`` is shared, ``B`` is split by
the same row transform as the weight.

Adding a family = adding a :class:`Family` value to :data:`FAMILIES`; no code branches on names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Callable, Optional

from megatron_mft.checkpoint.hf.transforms import COPY, GATED, QKV, VOCAB, Transform
from megatron_mft.config import ArchSpec
from megatron_mft.config.presets import LLAMA3_ROPE
from megatron_mft.errors import UsageError

LAYER = "{}"

#: Shape symbols of the weight maps.
SHAPE_SYMBOLS: dict[str, Callable[[ArchSpec], int]] = {
    "h": lambda a: a.hidden_size,
    "q": lambda a: a.num_attention_heads * a.head_dim,
    "kv": lambda a: a.num_query_groups * a.head_dim,
    "f": lambda a: a.ffn_hidden_size,
    "v": lambda a: a.vocab_size,
    "d": lambda a: a.head_dim,
    "e": lambda a: a.num_experts,
    "fe": lambda a: a.expert_ffn,
    "fs": lambda a: a.moe_shared_expert_size,
    "1": lambda a: 1,
}


def resolve_shape(symbols: tuple[str, ...], arch: ArchSpec) -> tuple[int, ...]:
    return tuple(SHAPE_SYMBOLS[s](arch) for s in symbols)


class ConversionError(UsageError, ValueError):
    """Every problem found, one per line (unknown, missing, mis-shaped tensors; config mismatches); exit 2."""

    def __init__(self, head: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


@dataclass(frozen=True)
class W:
    """One megatron tensor and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[str, ...], ...]
    transform: Transform = COPY
    #: the tensor exists only for architectures where this holds (e.g. untied output layer)
    when: Callable[[ArchSpec], bool] = lambda arch: True

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron

    def megatron_name(self, layer: Optional[int] = None) -> str:
        return self.megatron.format(layer) if self.per_layer else self.megatron

    def hf_names(self, layer: Optional[int] = None) -> list[str]:
        return [n.format(layer) if self.per_layer else n for n in self.hf]

    def hf_shapes(self, arch: ArchSpec) -> list[tuple[int, ...]]:
        return [resolve_shape(s, arch) for s in self.shapes]


@dataclass(frozen=True)
class ExpertW(W):
    """One tensor of each routed expert: names carry ``{}`` (layer) and ``{e}`` (expert); its
    entries come with ``layer = (layer, expert)``."""

    def megatron_name(self, layer=None) -> str:
        return self.megatron.format(layer[0], e=layer[1])

    def hf_names(self, layer=None) -> list[str]:
        return [n.format(layer[0], e=layer[1]) for n in self.hf]


_UNSET = object()


@dataclass(frozen=True)
class ConfigField:
    """ArchSpec field <- config.json key (first present of ``hf``), else ``default`` (a constant
    or another ArchSpec field's HF key). ``hf=()`` makes the field a constant of the family.
    ``null`` is the ArchSpec value that config.json writes as null (sliding_window 0)."""

    arch: str
    hf: tuple[str, ...]
    default: Any = None
    default_from: Optional[str] = None
    null: Any = _UNSET
    #: not written to config.json when equal to ``default`` (a RoPE factor of plain RoPE)
    omit_default: bool = False


@dataclass(frozen=True)
class Unsupported:
    """A config.json key whose value the engine cannot reproduce unless it is one of ``allowed``."""

    hf: str
    allowed: tuple
    why: str
    #: transformers' default when config.json omits the key
    default: Any = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architecture: str
    weights: tuple[W, ...]
    config: tuple[ConfigField, ...]
    unsupported: tuple[Unsupported, ...]
    #: HF tensors that carry no weights (regexes; e.g. rotary buffers of old exports).
    ignored_hf: tuple[str, ...] = ()
    #: HF config keys that may live in a nested dict: key -> parents, searched in order (the
    #: first parent is where export writes it), e.g. ``rope_theta`` inside ``rope_parameters``.
    nested: dict = field(default_factory=dict)

    # --------------------------------------------------------------- names
    def entries(self, arch: ArchSpec):
        """(W, layer or None) in checkpoint order: embeddings, layers in order, final norm, output."""
        weights = [w for w in self.weights if w.when(arch)]
        head = [w for w in weights if not w.per_layer and w.megatron.startswith("embedding.")]
        layer = [w for w in weights if w.per_layer]
        tail = [w for w in weights if not w.per_layer and not w.megatron.startswith("embedding.")]
        out = [(w, None) for w in head]
        out += [(w, (i, e) if isinstance(w, ExpertW) else i) for i in range(arch.num_layers) for w in layer
                for e in (range(arch.num_experts) if isinstance(w, ExpertW) else (None,))]
        out += [(w, None) for w in tail]
        return out

    def by_megatron(self) -> dict[str, W]:
        return {w.megatron: w for w in self.weights}

    def entry_for(self, megatron_name: str) -> tuple[W, Optional[int]]:
        """The entry and layer of a concrete megatron name (``decoder.layers.3.x`` -> (W, 3))."""
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", megatron_name)
        key, layer = (f"decoder.layers.{LAYER}.{m.group(2)}", int(m.group(1))) if m else (megatron_name, None)
        e = re.search(r"\.experts\.(\d+)\.", key)
        if e:  # a routed expert's tensor: (layer, expert)
            key, layer = key[:e.start()] + ".experts.{e}." + key[e.end():], (layer, int(e.group(1)))
        w = self.by_megatron().get(key)
        if w is None:
            raise KeyError(megatron_name)
        return w, layer

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in self.ignored_hf)

    # -------------------------------------------------------------- config
    def hf_value(self, cfg: dict, key: str) -> Any:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
        for parent in self.nested.get(key, ()):
            if isinstance(cfg.get(parent), dict) and cfg[parent].get(key) is not None:
                return cfg[parent][key]
        return None

    def hf_occurrences(self, cfg: dict, key: str) -> list[tuple[str, Any]]:
        """Every place ``key`` is set in config.json, as (dotted path, value): a config may carry
        both the 4.x ``rope_scaling`` and the 5.x ``rope_parameters``."""
        out = [(key, cfg[key])] if cfg.get(key) is not None else []
        for parent in self.nested.get(key, ()):
            if isinstance(cfg.get(parent), dict) and cfg[parent].get(key) is not None:
                out.append((f"{parent}.{key}", cfg[parent][key]))
        return out

    def arch_fields(self, cfg: dict) -> tuple[dict, list[str]]:
        """ArchSpec field values read from a config.json, and the problems found."""
        problems, out = [], {}
        for f in self.config:
            value = next((self.hf_value(cfg, k) for k in f.hf if self.hf_value(cfg, k) is not None), None)
            if value is None and f.null is not _UNSET and any(k in cfg and cfg[k] is None for k in f.hf):
                value = f.null  # an explicit null (Codestral's sliding_window), not a missing key
            if value is None and f.default_from:
                value = self.hf_value(cfg, f.default_from)
            if value is None:
                value = f.default
            if value is None:
                problems.append(f"config.json: {' or '.join(f.hf)} missing (needed for {f.arch})")
                continue
            out[f.arch] = value
        for u in self.unsupported:
            for path, value in self.hf_occurrences(cfg, u.hf) or [(u.hf, u.default)]:
                if value not in u.allowed:
                    problems.append(f"config.json: {path}={value!r} is not supported ({u.why})")
        if out.get("sliding_window", 0) < 0:
            problems.append(f"config.json: sliding_window={out['sliding_window']!r} must be positive or null")
        if "hidden_size" in out and "num_attention_heads" in out and "kv_channels" not in out:
            head_dim = self.hf_value(cfg, "head_dim")
            if head_dim is not None and head_dim * out["num_attention_heads"] != out["hidden_size"]:
                problems.append(f"config.json: head_dim={head_dim} is not hidden_size/num_attention_heads "
                                f"({out['hidden_size']}/{out['num_attention_heads']}); the engine derives it")
        return out, problems

    def hf_config(self, arch: ArchSpec, dtype: str, base: Optional[dict] = None) -> dict:
        """config.json for ``arch``. Keys of ``base`` (the source config) that the arch does not
        decide are kept (token ids, ...); the arch fields and the layout-affecting keys are set."""
        cfg = {k: v for k, v in (base or {}).items()
               if k not in ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                            *RESERVED_KEYS)}
        for f in self.config:
            for k in f.hf:
                cfg.pop(k, None)
                for parent in self.nested.get(k, ()):
                    if isinstance(cfg.get(parent), dict):
                        cfg[parent] = {kk: vv for kk, vv in cfg[parent].items() if kk != k}
        effective = arch.effective()  # 0 written as what it stands for (an expert's 0 size: ffn_hidden_size)
        for f in self.config:
            value = getattr(effective, f.arch)
            if not f.hf or (f.omit_default and value == f.default):
                continue
            if f.null is not _UNSET and value == f.null:
                value = None
            parents = self.nested.get(f.hf[0], ())
            if parents:
                cfg[parents[0]] = {**(cfg.get(parents[0]) or {}), f.hf[0]: value}
            else:
                cfg[f.hf[0]] = value
        if arch.rope_type == "llama3":  # megatron's constants, written out for transformers
            cfg["rope_parameters"] = {**cfg.get("rope_parameters", {}), **LLAMA3_ROPE}
        cfg.update(model_type=self.model_types[0], architectures=[self.architecture], head_dim=arch.head_dim,
                   dtype=dtype)
        return cfg


#: RoPE keys: transformers 4.x writes ``rope_theta`` + ``rope_scaling``, 5.x ``rope_parameters``.
ROPE_NESTED = {k: ("rope_parameters", "rope_scaling") for k in (
    "rope_theta", "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate", "mscale", "mscale_all_dim",
    "attention_factor")}
#: config.json keys export rewrites from the architecture (the source's copies are dropped)
RESERVED_KEYS = ("rope_scaling", "rope_parameters", "tie_word_embeddings")


def untied(arch: ArchSpec) -> bool:
    return not arch.tied_embeddings


def _decoder_weights(*, qkv_bias: bool = False, all_bias: bool = False, norm_bias: bool = False,
                     mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")) -> tuple[W, ...]:
    """Weight map of a HF pre-norm decoder (``model.layers.N.self_attn.q_proj`` ...). ``mlp``:
    (gate, up, down) for a gated MLP, (fc_in, fc_out) for a plain one."""
    L, A, M = "model.layers.{}.", "model.layers.{}.self_attn.", "model.layers.{}.mlp."
    qkv = tuple(f"{A}{n}_proj" for n in "qkv")
    out = [W("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("v", "h"),), VOCAB)]
    norms = [("self_attention.linear_qkv.layer_norm", f"{L}input_layernorm"),
             ("mlp.linear_fc1.layer_norm", f"{L}post_attention_layernorm")]
    out.append(W(f"decoder.layers.{{}}.{norms[0][0]}_weight", (f"{norms[0][1]}.weight",), (("h",),)))
    if norm_bias:
        out.append(W(f"decoder.layers.{{}}.{norms[0][0]}_bias", (f"{norms[0][1]}.bias",), (("h",),)))
    out.append(W("decoder.layers.{}.self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in qkv),
                 (("q", "h"), ("kv", "h"), ("kv", "h")), QKV))
    if qkv_bias or all_bias:
        out.append(W("decoder.layers.{}.self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in qkv),
                     (("q",), ("kv",), ("kv",)), QKV))
    out.append(W("decoder.layers.{}.self_attention.linear_proj.weight", (f"{A}o_proj.weight",), (("h", "q"),)))
    if all_bias:
        out.append(W("decoder.layers.{}.self_attention.linear_proj.bias", (f"{A}o_proj.bias",), (("h",),)))
    out.append(W(f"decoder.layers.{{}}.{norms[1][0]}_weight", (f"{norms[1][1]}.weight",), (("h",),)))
    if norm_bias:
        out.append(W(f"decoder.layers.{{}}.{norms[1][0]}_bias", (f"{norms[1][1]}.bias",), (("h",),)))
    if len(mlp) == 3:
        out.append(W("decoder.layers.{}.mlp.linear_fc1.weight", (f"{M}{mlp[0]}.weight", f"{M}{mlp[1]}.weight"),
                     (("f", "h"), ("f", "h")), GATED))
    else:
        out.append(W("decoder.layers.{}.mlp.linear_fc1.weight", (f"{M}{mlp[0]}.weight",), (("f", "h"),)))
        if all_bias:
            out.append(W("decoder.layers.{}.mlp.linear_fc1.bias", (f"{M}{mlp[0]}.bias",), (("f",),)))
    out.append(W("decoder.layers.{}.mlp.linear_fc2.weight", (f"{M}{mlp[-1]}.weight",), (("h", "f"),)))
    if all_bias:
        out.append(W("decoder.layers.{}.mlp.linear_fc2.bias", (f"{M}{mlp[-1]}.bias",), (("h",),)))
    out.append(W("decoder.final_layernorm.weight", ("model.norm.weight",), (("h",),)))
    if norm_bias:
        out.append(W("decoder.final_layernorm.bias", ("model.norm.bias",), (("h",),)))
    out.append(W("output_layer.weight", ("lm_head.weight",), (("v", "h"),), VOCAB, when=untied))
    return tuple(out)


def _config(family: str, *, norm_eps: str = "rms_norm_eps", norm_eps_default: float = 1e-6,
            kv_heads_default: Optional[int] = None, tied_default: bool = False, extra: tuple[ConfigField, ...] = ()) -> tuple[ConfigField, ...]:
    """The config map every family shares (sizes, RoPE, tying) plus its own fields; defaults are
    those of the family's transformers config class (a config.json may leave a field out)."""
    return (
        ConfigField("num_layers", ("num_hidden_layers",)),
        ConfigField("hidden_size", ("hidden_size",)),
        ConfigField("num_attention_heads", ("num_attention_heads",)),
        ConfigField("num_query_groups", ("num_key_value_heads",), default=kv_heads_default,
                    default_from=None if kv_heads_default else "num_attention_heads"),
        ConfigField("ffn_hidden_size", ("intermediate_size",)),
        ConfigField("vocab_size", ("vocab_size",)),
        ConfigField("max_position_embeddings", ("max_position_embeddings",)),
        ConfigField("rotary_base", ("rope_theta",), default=10000.0),
        ConfigField("norm_epsilon", (norm_eps,), default=norm_eps_default),
        ConfigField("tied_embeddings", ("tie_word_embeddings",), default=tied_default),
        ConfigField("rope_type", ("rope_type", "type"), default="default"),
        ConfigField("rope_factor", ("factor",), default=1.0, omit_default=True),
        ConfigField("rope_original_max_positions", ("original_max_position_embeddings",), default=0,
                    omit_default=True),
        ConfigField("family", (), default=family),
    ) + extra


#: features refused by name unless the engine reproduces them
_ROPE_UNSUPPORTED = (
    Unsupported("rope_type", ("default", "linear", "llama3", "yarn"),
                "RoPE scaling implemented: linear, llama3 and yarn; not dynamic, longrope", default="default"),
    Unsupported("type", (None, "default", "linear", "llama3", "yarn"),
                "RoPE scaling implemented: linear, llama3 and yarn"),
    *(Unsupported(k, (None, v), f"megatron-core's llama3 RoPE scaling has {k}={v:g}")
      for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"),
    *(Unsupported(k, (None, v), f"YaRN is implemented with transformers' default {k}={v}")
      for k, v in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True), ("mscale", None),
                   ("mscale_all_dim", None), ("attention_factor", None))),
)
_SWIGLU = (Unsupported("hidden_act", ("silu",), "the engine's gated MLP is SwiGLU with silu", default="silu"),)
_SWIGLU_CONSTANTS = (ConfigField("normalization", (), default="RMSNorm"),
                     ConfigField("activation", (), default="swiglu"))

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    architecture="LlamaForCausalLM",
    weights=_decoder_weights(),
    config=_config("llama", extra=_SWIGLU_CONSTANTS),
    unsupported=(
        *_SWIGLU,
        Unsupported("attention_bias", (None, False), "Llama with attention_bias (q/k/v and o biases) is not mapped"),
        Unsupported("mlp_bias", (None, False), "Llama with mlp_bias is not mapped"),
        Unsupported("pretraining_tp", (None, 1), "sliced linears at pretraining_tp > 1 are not mapped"),
        *_ROPE_UNSUPPORTED,
    ),
    ignored_hf=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    nested=ROPE_NESTED,
)

QWEN2 = Family(
    name="qwen2",
    model_types=("qwen2",),
    architecture="Qwen2ForCausalLM",
    weights=_decoder_weights(qkv_bias=True),
    config=_config("qwen2", kv_heads_default=32, extra=(*_SWIGLU_CONSTANTS, ConfigField("qkv_bias", (), default=True))),
    unsupported=(
        *_SWIGLU,
        Unsupported("use_sliding_window", (None, False),
                    "Qwen2's per-layer sliding window (max_window_layers) is not implemented"),
        *_ROPE_UNSUPPORTED,
    ),
    nested=ROPE_NESTED,
)

MISTRAL = Family(
    name="mistral",
    model_types=("mistral",),
    architecture="MistralForCausalLM",
    weights=_decoder_weights(),
    # transformers' MistralConfig defaults sliding_window to 4096 when config.json omits it
    config=_config("mistral", kv_heads_default=8, extra=(
        *_SWIGLU_CONSTANTS, ConfigField("sliding_window", ("sliding_window",), default=4096, null=0))),
    unsupported=(*_SWIGLU, *_ROPE_UNSUPPORTED),
    nested=ROPE_NESTED,
)

STARCODER2 = Family(
    name="starcoder2",
    model_types=("starcoder2",),
    architecture="Starcoder2ForCausalLM",
    weights=_decoder_weights(all_bias=True, norm_bias=True, mlp=("c_fc", "c_proj")),
    config=_config("starcoder2", norm_eps="norm_epsilon", norm_eps_default=1e-5, kv_heads_default=2,
                   tied_default=True, extra=(
        ConfigField("normalization", (), default="LayerNorm"),
        ConfigField("activation", (), default="gelu_tanh"),
        ConfigField("linear_bias", (), default=True),
        ConfigField("sliding_window", ("sliding_window",), default=0, null=0),
    )),
    unsupported=(
        Unsupported("hidden_act", ("gelu_pytorch_tanh",), "the engine's StarCoder2 MLP is GELU (tanh)",
                    default="gelu_pytorch_tanh"),
        Unsupported("use_bias", (None, True), "StarCoder2 without biases is not mapped"),
        *_ROPE_UNSUPPORTED,
    ),
    nested=ROPE_NESTED,
)

#: Registry keyed by family name.
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN2, MISTRAL, STARCODER2)}

from megatron_mft.checkpoint.hf.moe_families import MOE_FAMILIES  # noqa: E402 (uses the names above)

FAMILIES.update((f.name, f) for f in MOE_FAMILIES)


def _contradictions(fam: Family, arch: ArchSpec) -> list[str]:
    """ArchSpec fields whose value ``fam`` cannot represent: a constant of the family it differs from
    (Qwen2's QKV bias, StarCoder2's LayerNorm ...), or a field the family has no config.json key for
    that is not at its default (a sliding window on a Llama)."""
    mapped = {f.arch: f for f in fam.config}
    wrong = []
    for f in dataclass_fields(ArchSpec):
        spec = mapped.get(f.name)
        if f.name in ("hf_name", "family") or (spec is not None and spec.hf):
            continue  # documentation, or a value config.json carries
        want = spec.default if spec is not None else f.default
        if getattr(arch, f.name) != want:
            wrong.append(f"{f.name}={want!r} (the model has {getattr(arch, f.name)!r})")
    if "num_experts" in mapped and not arch.num_experts:  # a mixture-of-experts family
        wrong.append("num_experts > 0 (the model has 0)")
    return wrong


def family_problems(arch: ArchSpec, key: str = "model.family", fam: Optional[Family] = None) -> list[str]:
    """Why ``arch`` cannot be ``fam``'s (default: its own family's) Hugging Face model ([] when it
    can), with the families that would fit. Read off the registry, so a new family needs nothing here."""
    fam = fam or FAMILIES.get(arch.family)
    if fam is None:
        return [f"{key}: {arch.family!r} is not a known model family; known: {', '.join(FAMILIES)}"]
    wrong = _contradictions(fam, arch)
    if not wrong:
        return []
    fits = [f.name for f in FAMILIES.values() if f is not fam and not _contradictions(f, arch)]
    return [f"{key}: {fam.name} ({fam.architecture}) needs {', '.join(wrong)}; families that fit this "
            f"architecture: {', '.join(fits) or 'none'} (known: {', '.join(FAMILIES)})"]


def family_for(hf_config: dict) -> Family:
    """The family of a config.json (by ``model_type``); an error lists what is supported."""
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConversionError("unsupported Hugging Face model:", [f"config.json model_type={model_type!r}; "
                                                              f"supported: {', '.join(known)}"])

