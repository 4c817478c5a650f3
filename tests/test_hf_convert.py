"""Hugging Face <-> megatron conversion on one process (gloo, world size 1, fp32, CPU).

Parity: the converted checkpoint and ``model.hf_init`` both give transformers' logits; the
round trip hf -> mcore -> hf is bit-exact; RoPE conventions agree; the row layouts of the fused
tensors are the documented ones; bad inputs are refused with every problem named.
TP=2 / PP=2 parity: tests/test_convert_parallel.py. Peak memory: tests/test_hf_streaming.py.
LoRA export: tests/test_hf_lora.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch

from test_hf_fixtures import TINY, hf_state, make_hf_model

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def converted(tp1_env, tiny_hf, tmp_path_factory) -> Path:
    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore

    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    convert_hf_to_mcore(tiny_hf, out, tp=2, pp=2, log=lambda s: None)
    return out


def _tokens(n=2, s=24, vocab=TINY["vocab_size"]):
    from megatron_mft.checkpoint.hf.verify import random_tokens

    return random_tokens(vocab, n, s, seed=11)


# ------------------------------------------------------------------------------ layouts
def test_fused_layouts_are_megatrons():
    """q/k/v -> [per group: its query heads, its key head, its value head]; gate/up -> [gate; up]."""
    from megatron_mft.checkpoint.hf.transforms import GATED, QKV
    from megatron_mft.config import ArchSpec

    arch = ArchSpec(1, 4, 4, 2, 8, 10, 8, 1e4)  # head_dim 1, 2 query groups of 2 heads
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    fused = QKV.fuse([q, k, v], arch)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(QKV.split(fused, arch), [q, k, v]))
    b = torch.randn(8, 3)  # a LoRA B [out, r] goes through the same row transform
    assert torch.equal(QKV.fuse(QKV.split(b, arch), arch), b)
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    assert torch.equal(GATED.fuse([gate, up], arch), torch.cat([gate, up]))
    assert all(torch.equal(a, b) for a, b in zip(GATED.split(torch.cat([gate, up]), arch), [gate, up]))


def test_rope_conventions_agree(tp1_env):
    """megatron's non-interleaved RoPE == transformers' rotate_half on [first half | second half]."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb as mg_apply
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    from megatron_mft.config import ModelConfig, ParallelConfig
    from megatron_mft.model import transformer_config

    s, b, heads, d = 12, 1, 2, 16
    mcfg = ModelConfig(preset="tiny", hidden_size=heads * d, num_attention_heads=heads, num_query_groups=heads,
                       precision="fp32")
    tcfg = transformer_config(mcfg.arch(), mcfg, ParallelConfig(), tp1_env)
    assert not tcfg.rotary_interleaved
    freqs = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=1_000_000)(s)  # [s, 1, 1, d]
    x = torch.randn(s, b, heads, d)
    ours = mg_apply(x, freqs, config=tcfg)
    hf_cfg = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, rope_theta=1e6, max_position_embeddings=64)
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, torch.arange(s)[None])
    xh = x.permute(1, 2, 0, 3)  # [b, heads, s, d]
    theirs, _ = hf_apply(xh, xh, cos, sin)
    torch.testing.assert_close(ours, theirs.permute(2, 0, 1, 3), rtol=0, atol=1e-6)


def test_weight_map_names_every_tensor_of_every_preset(tp1_env):
    """The declarative map of each preset's family and megatron's own state dict name the same
    tensors (meta model with the preset's every feature, 2 layers)."""
    from megatron_mft.checkpoint.hf.families import FAMILIES
    from megatron_mft.checkpoint.hf.hf_to_mcore import check_map_covers_template
    from megatron_mft.checkpoint.hf.mcore_io import build_template
    from megatron_mft.config import PRESETS, ModelConfig

    for name in PRESETS:  # 2 layers: the per-layer entries repeat, and 80-layer meta models are slow to build
        cfg = ModelConfig(preset=name, num_layers=2)
        check_map_covers_template(build_template(cfg).names(), FAMILIES[cfg.arch().family], cfg.arch())


# ------------------------------------------------------------------------------ parity
def test_checkpoint_logits_equal_hf_logits(tp1_env, tiny_hf, converted):
    from megatron_mft.checkpoint.hf.verify import build_megatron, hf_logits, megatron_logits
    from megatron_mft.config import ParallelConfig

    chunks, cfg = build_megatron(tiny_hf, converted, ParallelConfig(), tp1_env)
    tokens = _tokens()
    ours = megatron_logits(chunks, tokens, cfg.arch().vocab_size)
    ref = hf_logits(tiny_hf, tokens)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    assert (ours - ref).abs().max().item() <= TOL


def test_hf_init_equals_checkpoint_and_hf(tp1_env, tiny_hf, converted):
    """load_hf_into_chunks (model.hf_init) gives the converted checkpoint's weights exactly."""
    from megatron_mft.checkpoint.dist import load_model_weights
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.checkpoint.hf.verify import hf_logits, megatron_logits
    from megatron_mft.config import ParallelConfig
    from megatron_mft.model import build_model_chunks

    cfg = dataclasses.replace(model_config_from_hf(read_hf_config(tiny_hf)), precision="fp32")
    a = build_model_chunks(cfg, ParallelConfig(), tp1_env)
    b = build_model_chunks(cfg, ParallelConfig(), tp1_env)
    load_hf_into_chunks(tiny_hf, a, cfg, ParallelConfig())
    load_model_weights(converted, b)
    sa, sb = a[0].state_dict(), b[0].state_dict()
    names = [k for k in sa if not k.endswith("_extra_state")]
    assert names and all(torch.equal(sa[k], sb[k]) for k in names)
    tokens = _tokens()
    assert (megatron_logits(a, tokens, cfg.arch().vocab_size) - hf_logits(tiny_hf, tokens)).abs().max() <= TOL


def test_round_trip_is_bit_exact(tp1_env, tiny_hf, converted, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf

    out = tmp_path / "back"
    export_to_hf(converted, out, max_shard_size="30KB", log=lambda s: None)
    src, back = hf_state(tiny_hf), hf_state(out)
    assert sorted(src) == sorted(back)
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src) and len(set(index["weight_map"].values())) > 3
    a, b = AutoConfig.from_pretrained(tiny_hf).to_dict(), AutoConfig.from_pretrained(out).to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rope_parameters", "rms_norm_eps", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "architectures", "tie_word_embeddings"):
        assert a.get(key) == b.get(key), key
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["test_marker"] == 0  # tokenizer files travelled hf -> mcore -> hf
    LlamaForCausalLM.from_pretrained(out)  # transformers loads it without complaint


def test_metadata_and_tokenizer_beside_checkpoint(converted):
    meta = json.loads((converted / "conversion.json").read_text())
    assert meta["model"]["vocab_size"] == TINY["vocab_size"] and meta["layout"]["tp"] == 2
    assert meta["dtype"] == "float32" and meta["source"]["tensors"] == 2 + 9 * TINY["num_hidden_layers"] + 1
    assert (converted / "tokenizer" / "tokenizer_config.json").is_file()
    assert json.loads((converted / "metadata.json").read_text())["sharded_backend"] == "torch_dist"


def test_single_file_and_pytorch_bin_inputs_match_sharded(tp1_env, tiny_hf, tmp_path):
    """model.safetensors (one file) and pytorch_model.bin (read with weights_only=True) map to the
    same megatron tensors as the sharded safetensors."""
    from safetensors.torch import save_file

    from megatron_mft.checkpoint.hf.families import LLAMA
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.checkpoint.hf.source import HFSource

    state = hf_state(tiny_hf)
    single, bin_dir = tmp_path / "single", tmp_path / "bin"
    for d in (single, bin_dir):
        d.mkdir()
        shutil.copy(tiny_hf / "config.json", d / "config.json")
    save_file(state, str(single / "model.safetensors"), metadata={"format": "pt"})
    torch.save(state, bin_dir / "pytorch_model.bin")
    cfg = read_hf_config(tiny_hf)
    arch = model_config_from_hf(cfg).arch()
    sources = [HFSource(d, LLAMA, arch, cfg) for d in (tiny_hf, single, bin_dir)]
    assert len(set(sources[0].weights.files.values())) > 5 and len(set(sources[1].weights.files.values())) == 1
    assert sources[2].weights.format == "pytorch_model.bin"
    for w, layer in LLAMA.entries(arch):
        name = w.megatron_name(layer)
        ref = sources[0].get(name)
        assert all(torch.equal(ref, s.get(name)) for s in sources[1:]), name


# ------------------------------------------------------------------------------ refusals
def _rewrite_shards(src: Path, dst: Path, edit) -> None:
    """Copy an HF folder, passing each shard's tensors through ``edit(dict) -> dict``."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for f in sorted(dst.glob("model-*.safetensors")):
        tensors = edit(hf_state_file(f))
        save_file(tensors, str(f), metadata={"format": "pt"})
        weight_map.update({k: f.name for k in tensors})
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def hf_state_file(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def test_missing_misshaped_and_unknown_tensors_are_all_named(tp1_env, tiny_hf, tmp_path):
    from megatron_mft.checkpoint.hf import ConversionError
    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore

    def edit(t):
        t.pop("model.layers.1.self_attn.k_proj.weight", None)
        if "model.layers.0.self_attn.v_proj.weight" in t:
            t["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(64, 64)
        if "model.norm.weight" in t:
            t["model.extra_adapter.weight"] = torch.zeros(3)
        return t

    bad = tmp_path / "bad"
    _rewrite_shards(tiny_hf, bad, edit)
    with pytest.raises(ConversionError) as e:
        convert_hf_to_mcore(bad, tmp_path / "out", log=lambda s: None)
    msg = str(e.value)
    assert "missing tensor model.layers.1.self_attn.k_proj.weight: expected shape [32, 64] (kv x h)" in msg
    assert "mis-shaped tensor model.layers.0.self_attn.v_proj.weight: has shape [64, 64], expected [32, 64]" in msg
    assert "unknown tensor model.extra_adapter.weight" in msg
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_cli_reports_errors_and_exits_nonzero(tp1_env, tiny_hf, tmp_path):
    from megatron_mft import convert

    cfg = json.loads((tiny_hf / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "longrope", "factor": 8.0},
                                                 "hidden_act": "gelu"}))
    err = io.StringIO()
    with redirect_stderr(err):
        rc = convert.main(["hf-to-mcore", "--hf-dir", str(bad), "--out", str(tmp_path / "o"), "--tp", "3"])
    assert rc == 2
    assert "hidden_act='gelu' is not supported" in err.getvalue() and "rope_scaling.rope_type='longrope'" in err.getvalue()
    err = io.StringIO()
    with redirect_stderr(err):
        rc = convert.main(["hf-to-mcore", "--hf-dir", str(tiny_hf), "--out", str(tmp_path / "o"), "--tp", "3",
                           "--pp", "3"])
    assert rc == 2
    assert "--tp: 3 does not divide num_attention_heads 4" in err.getvalue()
    assert "--pp: num_layers 2 not divisible by pp*vpp = 3" in err.getvalue()


def test_preset_is_recognised_or_every_mismatch_listed():
    from megatron_mft.checkpoint.hf import ConversionError
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf

    codellama_7b = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "vocab_size": 32016, "max_position_embeddings": 16384,
                    "rope_theta": 1000000, "rms_norm_eps": 1e-05, "hidden_act": "silu", "rope_scaling": None}
    assert model_config_from_hf(codellama_7b).preset == "codellama-7b"
    assert model_config_from_hf(codellama_7b, preset="codellama-7b").num_layers is None  # the preset as is
    with pytest.raises(ConversionError) as e:
        model_config_from_hf(codellama_7b, preset="llama2-7b")
    msg = str(e.value)
    for line in ("vocab_size: preset llama2-7b has 32000, config.json vocab_size has 32016",
                 "max_position_embeddings: preset llama2-7b has 4096", "rotary_base: preset llama2-7b has 10000.0"):
        assert line in msg
    other = model_config_from_hf({**codellama_7b, "num_hidden_layers": 3})  # no preset matches
    assert other.num_layers == 3 and other.arch().vocab_size == 32016


def test_llama3_rope_left_at_0_matches_its_own_export():
    """model.rope_type=llama3 with rope_original_max_positions 0 (megatron's built-in 8192): the
    export writes 8192, and ``convert verify`` / ``model.hf_init`` (check_model_config) accept it."""
    from megatron_mft.checkpoint.hf import ConversionError
    from megatron_mft.checkpoint.hf.families import FAMILIES
    from megatron_mft.checkpoint.hf.hfconfig import check_model_config
    from megatron_mft.config import ModelConfig

    cfg = ModelConfig(preset="tiny", rope_type="llama3", rope_factor=8.0)
    exported = FAMILIES["llama"].hf_config(cfg.arch(), "float32")
    assert exported["rope_parameters"]["original_max_position_embeddings"] == 8192
    check_model_config(cfg, exported, "export")
    with pytest.raises(ConversionError) as e:  # a real difference is still named, as the values it stands for
        check_model_config(dataclasses.replace(cfg, rope_type="linear"), exported, "export")
    assert "rope_type: model config (preset tiny) has 'linear', config.json rope_type has 'llama3'" in str(e.value)
    assert "rope_original_max_positions: model config (preset tiny) has 0, config.json" in str(e.value)


def test_hf_init_refuses_a_mismatched_model_config(tp1_env, tiny_hf):
    from megatron_mft.checkpoint.hf import ConversionError, load_hf_into_chunks
    from megatron_mft.config import ModelConfig

    cfg = ModelConfig(preset="tiny", num_layers=2, precision="fp32")  # tiny: hidden 128, vocab 2048
    with pytest.raises(ConversionError) as e:
        load_hf_into_chunks(tiny_hf, [], cfg)
    assert "hidden_size: model config (preset tiny) has 128, config.json hidden_size has 64" in str(e.value)
    assert "vocab_size" in str(e.value)


def test_verify_command_fails_above_tolerance(tp1_env, tiny_hf, converted, tmp_path, capsys):
    """``verify`` exits 0 on a faithful conversion and 1 when the logits differ (another model)."""
    from megatron_mft import convert

    args = ["verify", "--hf-dir", str(tiny_hf), "--ckpt", str(converted), "--tol", "1e-4", "--seq", "16"]
    assert convert.main(args) == 0
    assert "-> OK" in capsys.readouterr().out
    other = make_hf_model(tmp_path / "other", seed=5)
    assert convert.main(["verify", "--hf-dir", str(other), "--ckpt", str(converted), "--seq", "16"]) == 1
    assert "-> FAIL" in capsys.readouterr().out
    from megatron_mft.config import ParallelConfig
    from megatron_mft.training.parallel import init_parallel

    init_parallel(ParallelConfig(), tp1_env, 0)  # verify tore down megatron's parallel state; restore it


def test_training_checkpoint_exports_from_its_output_dir(tp1_env, tiny_hf, tmp_path):
    """A full-weights training checkpoint (run.json config) exports bit-exactly; the output_dir
    resolves to checkpoints/latest."""
    from megatron_mft.checkpoint.dist import save_checkpoint
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.config import ParallelConfig, RunConfig
    from megatron_mft.config.base import to_dict
    from megatron_mft.model import build_model_chunks

    cfg = dataclasses.replace(model_config_from_hf(read_hf_config(tiny_hf)), precision="fp32", hf_init=str(tiny_hf))
    chunks = build_model_chunks(cfg, ParallelConfig(), tp1_env)
    load_hf_into_chunks(tiny_hf, chunks, cfg, ParallelConfig())
    run = RunConfig(model=cfg, output_dir=str(tmp_path / "run"))
    first = next(chunks[0].parameters())
    kept = first.detach().clone()
    for step in (1, 2):  # step 1 holds other weights: only resolving to latest (step 2) gives the HF model back
        with torch.no_grad():
            first.copy_(kept + 1.0 if step == 1 else kept)
        save_checkpoint(tmp_path / "run" / "checkpoints", step, chunks, None, common={"step": step},
                        run_info={"config": to_dict(run), "peft": "none"})
    export_to_hf(tmp_path / "run", tmp_path / "out", log=lambda s: None)
    src, back = hf_state(tiny_hf), hf_state(tmp_path / "out")
    assert sorted(src) == sorted(back) and all(torch.equal(src[k], back[k]) for k in src)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()  # found through model.hf_init
