"""``model.family`` is checked before anything is built (training/preflight.py, read off the family
registry): an unknown family, or one whose Hugging Face class contradicts the architecture (the
preset with its overrides), is refused in one message naming the families that fit and the known
ones; every preset is consistent with its own family. (A family that contradicts a ``model.hf_init``
folder's config.json was already refused by preflight's config comparison.) The message reaches the
user as every preflight problem does (exit 2, no traceback: tests/test_cli_errors.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from train_helpers import ROOT


def _check(*overrides: str):
    from megatron_mft.config import load_config
    from megatron_mft.training.preflight import PreflightError, check_run

    cfg = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), list(overrides))
    with pytest.raises(PreflightError) as e:
        check_run(cfg, world_size=1)
    return str(e.value)


def test_every_preset_fits_its_family():
    from megatron_mft.checkpoint.hf.families import FAMILIES, family_problems
    from megatron_mft.config.presets import PRESETS

    assert {a.family for a in PRESETS.values()} <= set(FAMILIES)
    assert {name: family_problems(a) for name, a in PRESETS.items() if family_problems(a)} == {}
    # and each family's own constants are what makes the others refuse it
    sc2 = PRESETS["starcoder2-3b"]
    assert "normalization='LayerNorm'" in family_problems(replace(PRESETS["codellama-7b"], family="starcoder2"))[0]
    assert "qkv_bias=True" in family_problems(replace(PRESETS["llama3.1-8b"], family="qwen2"))[0]
    assert "linear_bias=False" in family_problems(replace(sc2, family="mistral"))[0]
    assert "num_experts > 0" in family_problems(replace(PRESETS["mistral-7b"], family="mixtral"))[0]
    assert "sliding_window=0" in family_problems(replace(PRESETS["mistral-7b"], family="llama"))[0]


def test_unknown_or_contradicting_family_is_refused_before_the_model_is_built(tmp_path):
    msg = _check("model.family=gpt5", f"output_dir={tmp_path / 'a'}")
    assert "model.family: 'gpt5' is not a known model family; known: llama, qwen2, mistral, starcoder2" in msg
    msg = _check("model.family=qwen2", f"output_dir={tmp_path / 'b'}")
    assert ("model.family: qwen2 (Qwen2ForCausalLM) needs qkv_bias=True (the model has False); families that "
            "fit this architecture: llama, mistral") in msg
    # consistent overrides are accepted: the tiny preset made a Qwen2 by its QKV bias
    from megatron_mft.checkpoint.hf.families import family_problems
    from megatron_mft.config import load_config

    cfg = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), ["model.family=qwen2", "model.qkv_bias=true"])
    assert family_problems(cfg.model.arch()) == []
    # a custom architecture that names no family (the preset's llama does not fit it) still trains
    from megatron_mft.training.preflight import PreflightError, check_run

    custom = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), ["model.linear_bias=true", f"output_dir={tmp_path / 'c'}"])
    try:
        check_run(custom, world_size=1)
    except PreflightError as e:  # e.g. the demo data not prepared: any problem but the family
        assert "model.family" not in str(e), str(e)


def test_overrides_that_make_the_preset_another_familys_model_train_with_a_warning(demo_data, tmp_path, capsys,
                                                                                   monkeypatch):
    """``model.num_experts`` on the Llama preset makes a Mixtral-shaped model: the run names no
    family, so it trains; the preflight says once (it runs twice: the trainer's, the recipe's) that
    the export will need ``--family`` and which family fits."""
    from megatron_mft.config import load_config
    from megatron_mft.training.preflight import check_run

    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    common = ["data.source=offline", f"data.path={demo_data}", "data.seq_length=512"]
    cfg = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"),
                      common + ["model.num_experts=4", "model.moe_top_k=2", f"output_dir={tmp_path / 'moe'}"])
    check_run(cfg, world_size=1)
    check_run(cfg, world_size=1)
    err = capsys.readouterr().err
    assert err.count("warning: model.family (preset tiny's): llama (LlamaForCausalLM) needs num_experts=0 (the model "
                     "has 4), moe_top_k=0 (the model has 2); families that fit this architecture: mixtral") == 1, err
    assert "needs --family to export it" in err
    named = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), common + [
        "model.num_experts=4", "model.moe_top_k=2", "model.family=mixtral", f"output_dir={tmp_path / 'mixtral'}"])
    check_run(named, world_size=1)
    assert "warning" not in capsys.readouterr().err

