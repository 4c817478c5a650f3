"""Typed configs: YAML + dotted overrides, every error reported at once with its field."""

import pytest

from megatron_mft.config import ConfigError, load_config


def test_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {path: /x}\ntrain: {steps: 5}\n")
    cfg = load_config(f, ["train.steps=7", "parallel.sp=true", "parallel.tp=2", "loss.task_weights.code=0.5"])
    assert cfg.train.steps == 7 and cfg.parallel.sp is True and cfg.parallel.tp == 2
    assert cfg.loss.task_weights == {"code": 0.5}


def test_all_errors_at_once(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {path: /x}\nmodel: {preset: tiny, bogus: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["train.steps=abc", "parallel.tp=3", "train.global_batch_size=7"])
    msg = str(e.value)
    for needle in ("model.bogus: unknown field", "train.steps: expected an integer",
                   "parallel.tp: 3 does not divide num_attention_heads", "train.global_batch_size: 7 is not a multiple"):
        assert needle in msg, msg


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.pp=3"], r"not divisible by pp\*vpp"),
    (["parallel.pp=2", "parallel.vpp=4"], r"not divisible by pp\*vpp"),
    (["parallel.sp=true"], "sequence parallelism needs parallel.tp >= 2"),
    (["model.preset=nope"], "unknown preset"),
    (["parallel.tp=4"], "does not divide num_query_groups"),
])
def test_invalid_layouts(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["data.path=/x"] + overrides)


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: 3\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(f)


def test_steps_from_epochs():
    from megatron_mft.training.optimizer import total_steps

    cfg = load_config(None, ["data.path=/x", "train.steps=0", "train.epochs=2", "train.global_batch_size=8"])
    assert total_steps(cfg, rows_per_epoch=100) == 25  # ceil(2 * 100 / 8)
    assert total_steps(load_config(None, ["data.path=/x", "train.steps=7"]), rows_per_epoch=100) == 7
    with pytest.raises(ConfigError, match="train.steps: 0 needs train.epochs"):
        load_config(None, ["data.path=/x", "train.steps=0"])


def test_loss_names_in_config_match_the_implementations():
    """The config's Literals are the contract; the loss package implements exactly those names."""
    from typing import get_args

    from megatron_mft.config.loss import BalancerName, LossMode
    from megatron_mft.loss.balancers import BALANCERS
    from megatron_mft.loss.modes import MODES

    assert set(MODES) == set(get_args(LossMode))
    assert set(BALANCERS) == set(get_args(BalancerName))


def _float_fields(cls, prefix=""):
    """Dotted override keys of every float field (plain, Optional, or mapping values) of a config."""
    import dataclasses
    import typing

    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            keys += _float_fields(tp, f"{prefix}{name}.")
        elif tp is float or (typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) and args == [float]):
            keys.append(f"{prefix}{name}")
        elif typing.get_origin(tp) is dict and typing.get_args(tp)[1] is float:
            keys.append(f"{prefix}{name}.some_task")
    return keys


def test_every_float_field_must_be_finite():
    """nan/inf passed every ``x < 0`` check (loss.gamma=.nan trained with a NaN loss; train.min_lr=.nan
    was an AssertionError deep in the scheduler): each is a problem naming its key, all at once."""
    from megatron_mft.config import RunConfig

    keys = _float_fields(RunConfig)
    assert {"loss.gamma", "train.min_lr", "train.lr", "loss.task_weights.some_task", "train.epochs"} <= set(keys)
    values = [".nan", ".inf", "-.inf", "nan", "1e999"]
    overrides = [f"{k}={values[i % len(values)]}" for i, k in enumerate(keys)]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=/x"] + overrides)
    msg = str(e.value)
    missing = [k for k in keys if f"{k}: must be a finite number" not in msg]
    assert not missing, msg
    assert len(e.value.problems) == len(keys), msg  # nothing else trips over the refused values
