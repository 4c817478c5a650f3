"""Typed run configuration, one dataclass per concern."""

from megatron_mft.config.base import ConfigError
from megatron_mft.config.data import DataConfig
from megatron_mft.config.loss import LossConfig
from megatron_mft.config.model import ModelConfig
from megatron_mft.config.parallel import ParallelConfig
from megatron_mft.config.peft import PeftConfig
from megatron_mft.config.presets import PRESETS, ArchSpec
from megatron_mft.config.run import RunConfig, load_config, tool_config
from megatron_mft.config.train import TrainConfig

__all__ = [
    "ArchSpec", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "PRESETS",
    "ParallelConfig", "PeftConfig", "RunConfig", "TrainConfig", "load_config", "tool_config",
]
