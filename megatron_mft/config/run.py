"""The whole run: one YAML file, one dataclass per concern, dotted command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_mft.config.base import deep_merge, load_dataclass, parse_overrides, read_yaml
from megatron_mft.config.data import DataConfig
from megatron_mft.config.loss import LossConfig
from megatron_mft.config.model import ModelConfig
from megatron_mft.config.parallel import ParallelConfig
from megatron_mft.config.peft import PeftConfig
from megatron_mft.config.train import TrainConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "outputs/run"
    seed: int = 1234

    def validate(self) -> list[str]:
        p = []
        if not self.model.validate():  # a known preset and sane fields: its arch can be checked
            a, par = self.model.arch(), self.parallel
            if par.tp >= 1 and a.num_attention_heads % par.tp:
                p.append(f"parallel.tp: {par.tp} does not divide num_attention_heads {a.num_attention_heads}")
            if par.tp >= 1 and a.num_query_groups % par.tp:
                p.append(f"parallel.tp: {par.tp} does not divide num_query_groups {a.num_query_groups}")
            stages = par.pp * (par.vpp or 1)
            if stages >= 1 and a.num_layers % stages:
                p.append(f"parallel.pp: num_layers {a.num_layers} not divisible by pp*vpp = {stages}")
            if par.sp and self.data.seq_length % max(par.tp, 1):
                p.append(f"parallel.sp: data.seq_length {self.data.seq_length} not divisible by tp {par.tp}")
        if not self.output_dir:
            p.append("output_dir: required")
        return p


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply dotted ``key=value`` overrides, build and validate."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return load_dataclass(RunConfig, data, source=str(path) if path else None)
