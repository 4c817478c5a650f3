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
from typing import Any, Callable, Optional

from megatron_mft.checkpoint.hf.transforms import COPY, GATED, QKV, VOCAB, Transform
from megatron_mft.config import ArchSpec
from megatron_mft.errors import UsageError

LAYER = "{}"

#: Shape symbols of the weight maps.
SHAPE_SYMBOLS: dict[str, Callable[[ArchSpec], int]] = {
    "h": lambda a: a.hidden_size,
    "q": lambda a: a.num_attention_heads * a.head_dim,
    "kv": lambda a: a.num_query_groups * a.head_dim,
    "f": lambda a: a.ffn_hidden_size,
    "v": lambda a: a.vocab_size,
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
class ConfigField:
    """ArchSpec field <- config.json key (first present of ``hf``), else ``default`` (a constant
    or another ArchSpec field's HF key)."""

    arch: str
    hf: tuple[str, ...]
    default: Any = None
    default_from: Optional[str] = None


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
    #: HF config keys that alias a nested value, e.g. ``rope_theta`` inside ``rope_parameters``.
    nested: dict = field(default_factory=dict)

    # --------------------------------------------------------------- names
    def entries(self, arch: ArchSpec):
        """(W, layer or None) in checkpoint order: embeddings, layers in order, final norm, output."""
        head = [w for w in self.weights if not w.per_layer and w.megatron.startswith("embedding.")]
        layer = [w for w in self.weights if w.per_layer]
        tail = [w for w in self.weights if not w.per_layer and not w.megatron.startswith("embedding.")]
        out = [(w, None) for w in head]
        out += [(w, i) for i in range(arch.num_layers) for w in layer]
        out += [(w, None) for w in tail]
        return out

    def by_megatron(self) -> dict[str, W]:
        return {w.megatron: w for w in self.weights}

    def entry_for(self, megatron_name: str) -> tuple[W, Optional[int]]:
        """The entry and layer of a concrete megatron name (``decoder.layers.3.x`` -> (W, 3))."""
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", megatron_name)
        key, layer = (f"decoder.layers.{LAYER}.{m.group(2)}", int(m.group(1))) if m else (megatron_name, None)
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
        parent = self.nested.get(key)
        if parent and isinstance(cfg.get(parent), dict):
            return cfg[parent].get(key)
        return None

    def arch_fields(self, cfg: dict) -> tuple[dict, list[str]]:
        """ArchSpec field values read from a config.json, and the problems found."""
        problems, out = [], {}
        for f in self.config:
            value = next((self.hf_value(cfg, k) for k in f.hf if self.hf_value(cfg, k) is not None), None)
            if value is None and f.default_from:
                value = self.hf_value(cfg, f.default_from)
            if value is None:
                value = f.default
            if value is None:
                problems.append(f"config.json: {' or '.join(f.hf)} missing (needed for {f.arch})")
                continue
            out[f.arch] = value
        for u in self.unsupported:
            value = self.hf_value(cfg, u.hf)
            value = u.default if value is None else value
            if isinstance(value, dict):
                value = value.get("rope_type", value.get("type"))
            if value not in u.allowed:
                problems.append(f"config.json: {u.hf}={value!r} is not supported ({u.why})")
        if "hidden_size" in out and "num_attention_heads" in out:
            head_dim = self.hf_value(cfg, "head_dim")
            if head_dim is not None and head_dim * out["num_attention_heads"] != out["hidden_size"]:
                problems.append(f"config.json: head_dim={head_dim} is not hidden_size/num_attention_heads "
                                f"({out['hidden_size']}/{out['num_attention_heads']}); the engine derives it")
        return out, problems

    def hf_config(self, arch: ArchSpec, dtype: str, base: Optional[dict] = None) -> dict:
        """config.json for ``arch``. Keys of ``base`` (the source config) that the arch does not
        decide are kept (token ids, ...); the arch fields and the layout-affecting keys are set."""
        cfg = {k: v for k, v in (base or {}).items()
               if k not in ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path")}
        for f in self.config:
            for k in f.hf:
                cfg.pop(k, None)
                parent = self.nested.get(k)
                if parent and isinstance(cfg.get(parent), dict):
                    cfg[parent] = {kk: vv for kk, vv in cfg[parent].items() if kk != k}
            cfg[f.hf[0]] = getattr(arch, f.arch)
        cfg.update(model_type=self.model_types[0], architectures=[self.architecture], tie_word_embeddings=False,
                   head_dim=arch.head_dim, dtype=dtype)
        return cfg


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    architecture="LlamaForCausalLM",
    weights=(
        W("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("v", "h"),), VOCAB),
        W("decoder.layers.{}.self_attention.linear_qkv.layer_norm_weight",
          ("model.layers.{}.input_layernorm.weight",), (("h",),)),
        W("decoder.layers.{}.self_attention.linear_qkv.weight",
          ("model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.self_attn.k_proj.weight",
           "model.layers.{}.self_attn.v_proj.weight"), (("q", "h"), ("kv", "h"), ("kv", "h")), QKV),
        W("decoder.layers.{}.self_attention.linear_proj.weight",
          ("model.layers.{}.self_attn.o_proj.weight",), (("h", "q"),)),
        W("decoder.layers.{}.mlp.linear_fc1.layer_norm_weight",
          ("model.layers.{}.post_attention_layernorm.weight",), (("h",),)),
        W("decoder.layers.{}.mlp.linear_fc1.weight",
          ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
          (("f", "h"), ("f", "h")), GATED),
        W("decoder.layers.{}.mlp.linear_fc2.weight", ("model.layers.{}.mlp.down_proj.weight",), (("h", "f"),)),
        W("decoder.final_layernorm.weight", ("model.norm.weight",), (("h",),)),
        W("output_layer.weight", ("lm_head.weight",), (("v", "h"),), VOCAB),
    ),
    config=(
        ConfigField("num_layers", ("num_hidden_layers",)),
        ConfigField("hidden_size", ("hidden_size",)),
        ConfigField("num_attention_heads", ("num_attention_heads",)),
        ConfigField("num_query_groups", ("num_key_value_heads",), default_from="num_attention_heads"),
        ConfigField("ffn_hidden_size", ("intermediate_size",)),
        ConfigField("vocab_size", ("vocab_size",)),
        ConfigField("max_position_embeddings", ("max_position_embeddings",)),
        ConfigField("rotary_base", ("rope_theta",), default=10000.0),
        ConfigField("norm_epsilon", ("rms_norm_eps",), default=1e-6),
    ),
    unsupported=(
        Unsupported("hidden_act", ("silu",), "the engine's MLP is SwiGLU with silu", default="silu"),
        Unsupported("attention_bias", (None, False), "the engine's linears have no biases"),
        Unsupported("mlp_bias", (None, False), "the engine's linears have no biases"),
        Unsupported("rope_scaling", (None, "default"), "only plain RoPE is implemented"),
        Unsupported("rope_parameters", (None, "default"), "only plain RoPE is implemented"),
        Unsupported("pretraining_tp", (None, 1), "sliced linears at pretraining_tp > 1 are not mapped"),
    ),
    ignored_hf=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    nested={"rope_theta": "rope_parameters"},
)

#: Registry keyed by family name.
FAMILIES: dict[str, Family] = {LLAMA.name: LLAMA}


def family_for(hf_config: dict) -> Family:
    """The family of a config.json (by ``model_type``); an error lists what is supported."""
    model_type = hf_config.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConversionError("unsupported Hugging Face model:", [f"config.json model_type={model_type!r}; "
                                                              f"supported: {', '.join(known)}"])

