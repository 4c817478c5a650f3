"""megatron-mft: multi-task fine-tuning (MFTCoder) of code LLMs on megatron-core."""

__version__ = "0.1.0"
