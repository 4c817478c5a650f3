"""Checkpoints: megatron dist-checkpoint save/load with exact resume (``dist``), the
``python -m megatron_mft.checkpoint init`` command, and Hugging Face conversion (``hf``)."""
