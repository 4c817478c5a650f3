"""Warnings the commands silence: known, harmless, and printed before anything a user asked for.
Imports nothing heavy, so a command can call it before torch loads."""

from __future__ import annotations


def quiet_known_warnings() -> None:
    """megatron-core warns on import about every optional kernel it lacks (and torch about APIs
    megatron still calls); the commands print one line naming the kernels in force instead."""
    import warnings

    for pattern in (r".*(Apex|Transformer Engine|TransformerEngine).*(not installed|Falling back).*",
                    r".*full scope is deprecated.*", r".*\.grad attribute of a Tensor that is not a leaf.*",
                    r".*is deprecated. Please use .*_single.*", r".*deprecating ShardedTensor.*",
                    r".*`load_state_dict` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
