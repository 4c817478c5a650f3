"""The whole run: one YAML file, one dataclass per concern, dotted command-line overrides."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_mft.config.base import (PATH, ConfigError, deep_merge, load_dataclass, parse_overrides, read_yaml,
                                      shell_variable_warnings, yaml_key)
from megatron_mft.config.data import DataConfig
from megatron_mft.config.loss import LossConfig, PreferenceConfig
from megatron_mft.config.model import ModelConfig
from megatron_mft.config.parallel import ParallelConfig, layout_problems
from megatron_mft.config.peft import PeftConfig
from megatron_mft.config.train import TrainConfig
from megatron_mft.errors import UsageError, first_rank


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = field(default="outputs/run", metadata=PATH)
    #: Seeds torch (weights, adapters, dropout) and numpy (data order, validation split): [0, 2**32).
    seed: int = 1234

    def validate(self) -> list[str]:
        p = []
        if not self.model.validate():  # a known preset and sane fields: its arch can be checked
            par = self.parallel
            p += layout_problems(self.model.arch(), par.tp, par.pp, par.vpp, ep=par.ep, etp=par.etp)
            if self.model.arch().num_experts and par.tp > 1 and not par.sp:
                p.append("parallel.sp: megatron's MoE layers with parallel.tp > 1 need parallel.sp: true")
            if (self.model.arch().num_experts and self.peft.method != "none" and (par.etp or 1) > 1
                    and {"linear_fc1", "linear_fc2"} & set(self.peft.target_modules)):
                p.append(f"parallel.etp: {par.etp} with peft.method {self.peft.method} on expert linears: adapters on "
                         f"experts need parallel.etp: 1 (expert tensor parallelism is megatron's token dispatcher's "
                         f"communication, which the adapter branch does not join; docs/moe.md)")
            if par.sp and self.data.seq_length % max(par.tp, 1):
                p.append(f"parallel.sp: data.seq_length {self.data.seq_length} not divisible by tp {par.tp}")
            if par.cp > 1 and self.data.seq_length % (2 * par.cp * (par.tp if par.sp else 1)):
                p.append(f"parallel.cp: data.seq_length {self.data.seq_length} not divisible by 2 x cp"
                         f"{' x tp' if par.sp else ''} = {2 * par.cp * (par.tp if par.sp else 1)}")
        if not self.output_dir:
            p.append("output_dir: required")
        stage = self.train.stage
        default = PreferenceConfig()
        for name, readers in PreferenceConfig.READ_BY.items():  # each stage reads its own settings only
            if stage not in readers and getattr(self.loss.preference, name) != getattr(default, name):
                key = yaml_key(name)
                hint = ("; ORPO's odds-ratio weight, TRL's beta, is loss.preference.lambda"
                        if stage == "orpo" and name == "beta" else "")
                p.append(f"loss.preference.{key}: set, but train.stage is {stage} ({key} is read by train.stage "
                         f"{' or '.join(readers)} only{hint}); set train.stage, or remove it")
        if self.data.source == "online" and (stage != "sft") != (self.data.mode == "preference"):
            p.append(f"train.stage {stage}: data.mode {self.data.mode} (data.source online); " + (
                "the preference stages read {chosen, rejected} pairs: set data.mode=preference" if stage != "sft"
                else "preference pairs are for train.stage dpo or orpo: set train.stage, or another data.mode"))
        if not 0 <= self.seed < SEED_LIMIT:  # numpy's generators refuse negative seeds (after the model is built)
            p.append(f"seed: must be in [0, 2**32 - 1], got {self.seed}")
        return p

    def warnings(self) -> list[str]:
        """What is allowed but probably not meant; ``load_config`` prints these (first rank only)."""
        w = self.peft.warnings() + shell_variable_warnings(self)
        t = self.train
        if t.steps > 0 and t.epochs:
            w.append(f"train.epochs {t.epochs:g} is not used: train.steps {t.steps} decides the length "
                     f"(train.steps=0 trains for epochs; train.epochs=null silences this)")
        if not self.model.validate():
            w += self.model.warnings()
            arch = self.model.arch()
            scaled = arch.rope_type != "default"  # RoPE scaling, the preset's own or set in this config
            if self.data.seq_length > arch.max_position_embeddings and not scaled:
                limit = (f"model.max_position_embeddings {arch.max_position_embeddings}"
                         if self.model.max_position_embeddings is not None
                         else f"max_position_embeddings {arch.max_position_embeddings} of preset {self.model.preset}")
                w.append(f"data.seq_length {self.data.seq_length} exceeds {limit}: positions past it were never "
                         f"trained (RoPE extrapolates). If meant, set model.max_position_embeddings >= "
                         f"{self.data.seq_length} or configure RoPE scaling (model.rope_type, model.rope_factor, "
                         f"model.rope_original_max_positions); otherwise lower data.seq_length")
        return w


#: seeds are below this: numpy's legacy ``np.random.seed`` limit, within torch's (uint64, plus megatron's offsets)
SEED_LIMIT = 2**32


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply dotted ``key=value`` overrides, build and validate. A problem in
    the file and problems in the overrides are reported together; warnings go to stderr."""
    problems: list[str] = []
    data, extra = {}, {}
    try:
        data = read_yaml(path) if path else {}
    except ConfigError as e:
        problems += e.problems
    try:
        extra = parse_overrides(overrides or [])
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems, source=str(path) if path else None)
    try:
        cfg = load_dataclass(RunConfig, deep_merge(data, extra), source=str(path) if path else None)
    except ConfigError as e:
        raise _blame_overrides(e, path, extra) from None
    if first_rank():
        for w in cfg.warnings():
            print(f"warning: {w}", file=sys.stderr, flush=True)
    return cfg


def _blame_overrides(error: ConfigError, path, extra: dict) -> ConfigError:
    """The same problems under a head that names where they come from: the command line when its
    overrides (``extra``, parsed) caused them all (the YAML file may not even hold the key), both
    when some."""
    ours = sum(_overridden(p.partition(":")[0], extra) for p in error.problems)
    if not ours:
        return error
    source = "(the key=value overrides" + (f" on {path})" if path else ")") if ours == len(error.problems) else \
        f"{path} and its key=value overrides" if path else "(the key=value overrides)"
    return ConfigError(error.problems, source=source)


def _overridden(key: str, extra: dict) -> bool:
    """Whether the dotted field ``key`` of a problem (``loss.preference.lambda``, ``trian``) is, or
    lies under, a value the overrides set."""
    node = extra
    for part in key.strip().split("."):
        if not isinstance(node, dict):
            return True  # the overrides set a section's whole value above this key
        names = {str(k).replace("-", "_"): v for k, v in node.items()}
        if part not in names:
            return False
        node = names[part]
    return True


def _without_rope(cfg: RunConfig) -> None:
    cfg.model.applies_rope = False


def tool_config(tool: str, settings: dict, options: dict[str, str], *, rope: bool = True,
                problems: Sequence[str] = ()) -> RunConfig:
    """The run config of ``settings`` (dotted key -> value, over the defaults), validated by the
    training config's own rules, for a tool whose options describe a model or a layout (the
    benches): what training would refuse, the tool refuses alike, before any work. Each problem
    names the tool's option where ``options`` maps its key (``{"model.num_attention_heads":
    "--heads"}``), also where the message names that field bare. ``rope=False``: the tool's
    attention applies no RoPE, so its even-head-size rule is left out. ``problems``: the tool's own,
    reported with these. One UsageError (exit 2)."""
    data: dict = {"data": {"path": "-"}}  # a required field no tool reads
    for key, value in settings.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    found: list[str] = []
    try:
        cfg = load_dataclass(RunConfig, data, adjust=None if rope else _without_rope)
    except ConfigError as e:
        found = e.problems
    for key in sorted(options, key=len, reverse=True):  # model.moe_ffn_hidden_size before model.ffn_hidden_size
        section, name = key.split(".")
        field_name = re.compile(rf"(?<![\w.-])(?:{re.escape(section)}\.)?{re.escape(name)}\b")
        found = [field_name.sub(options[key], p) for p in found]
    if found or problems:
        raise UsageError(f"{tool}: invalid options:\n" + "\n".join(f"  - {p}" for p in [*found, *problems]))
    return cfg
