"""flash-attn computes only in fp16/bf16: fp32 with flash is refused at config load, and the
``auto`` backend never picks flash-attn for fp32 (PEFT's local layers included)."""

from __future__ import annotations

import dataclasses

import pytest


def _cfg(*over):
    from megatron_mft.config import load_config

    return load_config(None, ["data.path=/unused", *over])


def test_fp32_with_flash_is_refused_at_load():
    from megatron_mft.config.base import ConfigError

    with pytest.raises(ConfigError, match=r"model\.attention_backend: flash-attn computes only in fp16/bf16, "
                                          r"but model\.precision is fp32"):
        _cfg("model.precision=fp32", "model.attention_backend=flash")
    _cfg("model.precision=bf16", "model.attention_backend=flash")  # accepted
    _cfg("model.precision=fp32", "model.attention_backend=auto")  # accepted: resolved below


@pytest.mark.parametrize("precision,te,want,want_peft", [
    ("fp32", False, "sdpa", "sdpa"), ("bf16", False, "flash", "flash"), ("auto", False, "flash", "flash"),
    ("fp32", True, "te", "sdpa"), ("bf16", True, "te", "flash")])
def test_auto_backend_on_a_flash_machine(precision, te, want, want_peft):
    from megatron_mft.compat import Environment
    from megatron_mft.model import attention_backend

    env = Environment(cuda=True, te=te, flash_attn=True, apex=False, device_name="H100 (assumed)")
    model = _cfg(f"model.precision={precision}").model
    assert attention_backend(model, env) == want
    assert attention_backend(model, env, local_only=True) == want_peft
    explicit_te = dataclasses.replace(model, attention_backend="te")
    if te:
        assert attention_backend(explicit_te, env, local_only=True) == want_peft
