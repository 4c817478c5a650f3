"""Model families on one process (gloo, world size 1, fp32, CPU): for Llama-3.x, Qwen2.5,
DeepSeek-Coder, Mistral and StarCoder2 tiny random models, megatron's logits equal transformers'
(unpacked rows and packed samples, sequences longer than the sliding windows and than
DeepSeek's max_position_embeddings); hf -> mcore -> hf is bit-exact and loads with the family's
own class; config.json is read in both the transformers 4.x and 5.x forms; unimplemented
features are refused by name. TP=2 (+SP) and PP=2: tests/test_families_parallel.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from test_families_fixtures import FAMILIES, FAMILY_CONFIGS, REGISTRY_FAMILY, TOL, make_all, parity
from test_hf_fixtures import hf_state


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("families"))


def _hf_init_chunks(env, hf_dir: Path):
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.config import ParallelConfig
    from megatron_mft.model import build_model_chunks

    cfg = dataclasses.replace(model_config_from_hf(read_hf_config(hf_dir)), precision="fp32")
    chunks = build_model_chunks(cfg, ParallelConfig(), env)
    load_hf_into_chunks(hf_dir, chunks, cfg, ParallelConfig())
    return chunks, cfg


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers_unpacked_and_packed(tp1_env, family_models, name):
    chunks, cfg = _hf_init_chunks(tp1_env, family_models[name])
    assert cfg.arch().family == REGISTRY_FAMILY[name]
    rows, packed = parity(chunks, family_models[name])
    assert rows <= TOL and packed <= TOL, (name, rows, packed)


def test_family_features_reach_megatron(tp1_env, family_models):
    """The architecture read from each config.json, and the built model, have the family's features."""
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config

    arch = {n: model_config_from_hf(read_hf_config(family_models[n])).arch() for n in FAMILIES}
    l3 = arch["llama3"]
    assert (l3.rope_type, l3.rope_factor, l3.tied_embeddings) == ("llama3", 8.0, True)
    assert (arch["deepseek"].rope_type, arch["deepseek"].rope_factor) == ("linear", 4.0)
    assert arch["qwen2"].qkv_bias and not arch["qwen2"].linear_bias and arch["qwen2"].sliding_window == 0
    assert arch["mistral"].sliding_window == 12
    sc = arch["starcoder2"]
    assert (sc.normalization, sc.activation, sc.linear_bias, sc.tied_embeddings, sc.sliding_window) == (
        "LayerNorm", "gelu_tanh", True, True, 12)
    chunks, _ = _hf_init_chunks(tp1_env, family_models["starcoder2"])
    cfg = chunks[0].config
    assert cfg.window_size == (11, 0) and cfg.add_bias_linear and not cfg.gated_linear_unit
    assert chunks[0].output_layer.weight is None  # tied: the output layer reads the embedding


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_is_bit_exact_and_loads_with_the_family_class(tp1_env, family_models, tmp_path, name):
    import transformers

    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from test_families_fixtures import FAMILY_CONFIGS

    src = family_models[name]
    convert_hf_to_mcore(src, tmp_path / "ckpt", log=lambda s: None)
    export_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="60KB", log=lambda s: None)
    a, b = hf_state(src), hf_state(tmp_path / "back")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((src / "config.json").read_text())
    cb = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in set(ca) - {"transformers_version", "dtype", "torch_dtype"}:
        assert ca[key] == cb.get(key), (name, key, ca[key], cb.get(key))
    model_cls = getattr(transformers, FAMILY_CONFIGS[name][1])
    loaded = model_cls.from_pretrained(tmp_path / "back")
    assert type(loaded) is model_cls


def _four_x(cfg: dict) -> dict:
    """The transformers 4.x spelling of a 5.x config.json: rope_theta + rope_scaling."""
    out = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    rope = dict(cfg.get("rope_parameters") or {})
    out["rope_theta"] = rope.pop("rope_theta", 10000.0)
    kind = rope.pop("rope_type", "default")
    out["rope_scaling"] = None if kind == "default" else {"type" if kind == "linear" else "rope_type": kind, **rope}
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_4x_and_5x_config_forms_read_alike(family_models, name):
    from megatron_mft.checkpoint.hf.families import family_for

    five = json.loads((family_models[name] / "config.json").read_text())
    assert "rope_parameters" in five and "rope_theta" not in five  # transformers 5 wrote it
    four = _four_x(five)
    fam = family_for(five)
    (f5, p5), (f4, p4) = fam.arch_fields(five), fam.arch_fields(four)
    assert p5 == [] and p4 == [] and f5 == f4


def test_unimplemented_features_are_refused_by_name(family_models):
    from megatron_mft.checkpoint.hf import ConversionError
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf

    def refused(name, **edit):
        cfg = {**json.loads((family_models[name] / "config.json").read_text()), **edit}
        with pytest.raises(ConversionError) as e:
            model_config_from_hf(cfg)
        return str(e.value)

    longrope = {"rope_type": "longrope", "rope_theta": 1e6, "factor": 4.0}
    msg = refused("qwen2", rope_parameters=longrope, use_sliding_window=True)
    assert "rope_parameters.rope_type='longrope' is not supported" in msg
    assert "use_sliding_window=True is not supported" in msg
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 16}
    assert "rope_parameters.beta_fast=16 is not supported" in refused("qwen2", rope_parameters=yarn)
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_parameters.low_freq_factor=2.0 is not supported" in refused("llama3", rope_parameters=llama3)
    assert "hidden_act='gelu' is not supported" in refused("starcoder2", hidden_act="gelu")
    assert "rope_scaling.type='dynamic' is not supported" in refused(
        "deepseek", rope_parameters=None, rope_theta=1e5, rope_scaling={"type": "dynamic", "factor": 2.0})


#: config.json of one model per family as the hub has it (transformers 4.x spelling; the keys
#: that matter for the architecture), which must be recognised as our preset.
HUB_CONFIGS = {
    "llama3.2-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
                    "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "head_dim": 64,
                    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "qwen2.5-coder-0.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
                           "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                           "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
                           "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                           "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768,
                           "max_window_layers": 24, "rope_scaling": None},
    "deepseek-coder-33b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 7168,
                           "intermediate_size": 19200, "num_hidden_layers": 62, "num_attention_heads": 56,
                           "num_key_value_heads": 8, "vocab_size": 32256, "max_position_embeddings": 16384,
                           "rms_norm_eps": 1e-06, "rope_theta": 100000, "tie_word_embeddings": False,
                           "hidden_act": "silu", "pretraining_tp": 1,
                           "rope_scaling": {"factor": 4.0, "type": "linear"}},
    "codestral-22b": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 6144,
                      "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48,
                      "num_key_value_heads": 8, "vocab_size": 32768, "max_position_embeddings": 32768,
                      "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                      "tie_word_embeddings": False, "hidden_act": "silu"},
    "starcoder2-3b": {"model_type": "starcoder2", "architectures": ["Starcoder2ForCausalLM"], "hidden_size": 3072,
                      "intermediate_size": 12288, "num_hidden_layers": 30, "num_attention_heads": 24,
                      "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 16384,
                      "norm_epsilon": 1e-05, "rope_theta": 999999.4420358813, "sliding_window": 4096,
                      "use_bias": True, "hidden_act": "gelu_pytorch_tanh", "norm_type": "layer_norm"},
}


@pytest.mark.parametrize("preset", sorted(HUB_CONFIGS))
def test_hub_config_is_recognised_as_its_preset(preset):
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf

    assert model_config_from_hf(HUB_CONFIGS[preset]).preset == preset
    assert model_config_from_hf(HUB_CONFIGS[preset], preset=preset).preset == preset


def test_yarn_qwen2_logits_equal_transformers_beyond_the_original_context(tp1_env, tmp_path):
    """Long-context Qwen2.5 (rope_type yarn, factor 4): transformers' frequencies and attention
    factor, on sequences longer than the original context (16 positions here)."""
    from test_families_fixtures import make_family_model

    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16}
    hf = make_family_model("qwen2", tmp_path / "yarn", seed=5, rope_parameters=yarn, max_position_embeddings=64)
    chunks, cfg = _hf_init_chunks(tp1_env, hf)
    arch = cfg.arch()
    assert (arch.rope_type, arch.rope_factor, arch.rope_original_max_positions) == ("yarn", 4.0, 16)
    rows, packed = parity(chunks, hf)
    assert rows <= TOL and packed <= TOL, (rows, packed)


def test_yarn_round_trip_hf_mcore_hf(tp1_env, tmp_path):
    """hf -> mcore -> hf of a YaRN model (the conversion builds its layout on the meta device):
    the checkpoint gives transformers' logits past the original context, the export is bit-exact
    with the same rope_parameters."""
    from test_families_fixtures import make_family_model, tokens

    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.checkpoint.hf.verify import build_megatron, hf_logits, megatron_logits
    from megatron_mft.config import ParallelConfig

    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16}
    src = make_family_model("qwen2", tmp_path / "yarn", seed=6, rope_parameters=yarn, max_position_embeddings=64)
    convert_hf_to_mcore(src, tmp_path / "ckpt", log=lambda s: None)
    chunks, cfg = build_megatron(src, tmp_path / "ckpt", ParallelConfig(), tp1_env)
    batch = tokens()
    assert batch.shape[1] > 16
    assert (megatron_logits(chunks, batch, cfg.arch().vocab_size) - hf_logits(src, batch)).abs().max() <= TOL
    export_to_hf(tmp_path / "ckpt", tmp_path / "back", log=lambda s: None)
    a, b = hf_state(src), hf_state(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["rope_parameters"] == json.loads((src / "config.json").read_text())["rope_parameters"]


def test_tied_checkpoint_that_also_stores_lm_head_loads(tp1_env, family_models, tmp_path):
    """Some tied checkpoints store lm_head.weight too; transformers ties it to the embedding on
    load (the stored copy is not used), and so does the conversion instead of refusing it."""
    import shutil

    from safetensors.torch import save_file

    src = family_models["llama3"]
    state = hf_state(src)
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    out = tmp_path / "with_head"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    chunks, _ = _hf_init_chunks(tp1_env, out)
    rows, packed = parity(chunks, out)
    assert rows <= TOL and packed <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_fields_left_out_of_config_json_read_as_transformers_defaults(name):
    """A hub config.json may omit fields with defaults; we must read what the family's own
    transformers config class assumes for them (StarCoder2's norm epsilon is 1e-5, not 1e-6)."""
    import transformers

    from megatron_mft.checkpoint.hf.families import family_for

    cls_name, model_cls, kwargs = FAMILY_CONFIGS[name]
    required = {k: v for k, v in kwargs.items() if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "max_position_embeddings")}
    model_type = getattr(transformers, cls_name).model_type
    sparse = {**required, "model_type": model_type, "architectures": [model_cls]}
    full = getattr(transformers, cls_name)(**required).to_dict()
    fam = family_for(sparse)
    (got, p1), (want, p2) = fam.arch_fields(sparse), fam.arch_fields({**full, "architectures": [model_cls]})
    assert p1 == [] and p2 == []
    assert got == want
